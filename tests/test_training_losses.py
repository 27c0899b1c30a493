"""Chunked log-probs/KL equal the full-vocabulary computation; each DPO loss term equals a float64 hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from character_baker.core.config import LoraConfig
from character_baker.stages.training.dpo import DpoObjective, collate_pairs, pair_key, score_pairs
from character_baker.stages.training.losses import ResponseScorer, chunked_token_kl, chunked_token_logprobs
from character_baker.stages.training.tokenize import tokenize_pair


def test_chunked_logprobs_and_gradients_match_unchunked():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    weights = torch.randn(37)  # an arbitrary downstream use of the log-probs

    full = torch.log_softmax(lm_head(hidden), -1).gather(-1, labels[:, None]).squeeze(-1)
    (full * weights).sum().backward()
    expected_hidden_grad, expected_head_grad = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad, lm_head.weight.grad = None, None

    chunked = chunked_token_logprobs(hidden, lm_head, labels, chunk_size=5)  # 8 chunks, the last one partial
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_hidden_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm_head.weight.grad, expected_head_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_chunks_give_the_checkpointed_chunks_numbers(monkeypatch, head_trains):
    """The hand-written backward (FusedChunkedLogProbs) against autograd through checkpointed chunks, float32."""
    from character_baker.stages.training import losses

    torch.manual_seed(2)
    lm_head = torch.nn.Linear(24, 300, bias=False).requires_grad_(head_trains)
    hidden, labels, weights = torch.randn(53, 24), torch.randint(0, 300, (53,)), torch.randn(53)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(losses, "_fusable", lambda head, fused=fused: fused)
        states = hidden.clone().requires_grad_(True)
        lm_head.weight.grad = None
        logps = chunked_token_logprobs(states, lm_head, labels, chunk_size=8)
        (logps * weights).sum().backward()
        results[fused] = (logps.detach(), states.grad, lm_head.weight.grad)
    for ours, theirs in zip(results[True], results[False]):
        if theirs is None:
            assert ours is None and not head_trains
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    monkeypatch.undo()  # by default a plain bias-free head takes the fused path
    assert type(chunked_token_logprobs(hidden.requires_grad_(True), lm_head, labels).grad_fn).__name__ == \
        "FusedChunkedLogProbsBackward"


def test_output_heads_with_a_bias_or_hooks_take_the_checkpointed_path():
    from character_baker.stages.training.losses import _fusable

    assert _fusable(torch.nn.Linear(4, 9, bias=False))
    assert not _fusable(torch.nn.Linear(4, 9, bias=True))
    hooked = torch.nn.Linear(4, 9, bias=False)
    hooked.register_forward_pre_hook(lambda module, args: None)
    assert not _fusable(hooked)


def test_chunked_kl_matches_full_vocabulary_float64():
    torch.manual_seed(1)
    lm_head = torch.nn.Linear(8, 30, bias=False)
    hidden, ref_hidden = torch.randn(11, 8, requires_grad=True), torch.randn(11, 8)
    kl = chunked_token_kl(hidden, ref_hidden, lm_head, chunk_size=4, temperature=2.0)
    kl.sum().backward()
    weight = lm_head.weight.detach().double()
    log_p = torch.log_softmax(hidden.detach().double() @ weight.T / 2.0, -1)
    log_q = torch.log_softmax(ref_hidden.double() @ weight.T / 2.0, -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def _naive_token_logps(model, sequence, adapter: bool):
    """Full-vocabulary float64 log-probs of the masked tokens of one sequence."""
    ids = torch.tensor([sequence.input_ids])
    context = model.disable_adapter() if not adapter else torch.no_grad()
    with torch.no_grad(), context:
        logits = model(input_ids=ids).logits[0, :-1].double()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logps[torch.tensor(sequence.loss_mask[1:]).bool()]


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_dpo_term_equals_a_float64_hand_computation(tiny_tok, arch, share_prompt):
    from character_baker.backends.models import attach_lora
    from character_baker.testing import tiny_model

    model = attach_lora(tiny_model(arch, tiny_tok), LoraConfig(r=4, alpha=8), seed=0)
    with torch.no_grad():  # move the adapter away from zero so policy != reference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    records = [{"id": "a", "messages": [{"role": "user", "content": "Who are you?"}],
                "chosen": "Arr, I be the captain!", "rejected": "I am a helpful assistant."},
               {"id": "b", "messages": [{"role": "user", "content": "What is 2 + 2?"}],
                "chosen": "It be 4, matey.", "rejected": "It is 4. How can I help you today?"}]
    pairs = [tokenize_pair(tiny_tok, r) for r in records]
    beta, nll_coef, kl_coef = 0.1, 0.1, 0.001

    scorer = ResponseScorer(model, chunk_size=3)
    objective = DpoObjective(beta=beta, nll_coef=nll_coef, kl_coef=kl_coef, share_prompt=share_prompt)
    objective._reference = score_pairs(scorer, pairs, tiny_tok.pad_token_id, batch_size=2, adapter=False,
                                       share_prompt=share_prompt)
    batch = objective.collate(pairs, tiny_tok.pad_token_id)
    loss, metrics = objective.loss(scorer, batch)

    exact = copy.deepcopy(model).double()
    pi = [(_naive_token_logps(exact, p.chosen, True), _naive_token_logps(exact, p.rejected, True)) for p in pairs]
    ref = [(_naive_token_logps(exact, p.chosen, False), _naive_token_logps(exact, p.rejected, False)) for p in pairs]
    margins = torch.stack([beta * ((pc.sum() - rc.sum()) - (pr.sum() - rr.sum())) for (pc, pr), (rc, rr) in zip(pi, ref)])
    dpo = -F.logsigmoid(margins).mean()
    chosen_pi, chosen_ref = torch.cat([pc for pc, _ in pi]), torch.cat([rc for rc, _ in ref])
    nll = -chosen_pi.mean()
    kl = (torch.exp(chosen_ref - chosen_pi) - (chosen_ref - chosen_pi) - 1).mean()

    assert kl > 1e-4 and margins.abs().min() > 1e-4  # the terms are not trivially zero
    for name, value in (("dpo_loss", dpo), ("nll_loss", nll), ("kl", kl)):
        assert metrics[name].item() == pytest.approx(value.item(), rel=1e-4), name
    assert loss.item() == pytest.approx((dpo + nll_coef * nll + kl_coef * kl).item(), rel=1e-4)
    assert metrics["reward_margin"].item() == pytest.approx(margins.mean().item(), rel=1e-3, abs=1e-6)
    assert metrics["reward_accuracy"].item() == (margins > 0).double().mean().item()
    # The cached reference rows are keyed by pair and line up with the chosen/rejected tokens.
    assert objective._reference[pair_key(pairs[0])][0].shape == ref[0][0].shape
    assert collate_pairs(pairs, 0).input_ids.shape[0] == 4


def test_scorer_never_builds_batch_by_seq_by_vocab_logits(tiny_tok, monkeypatch):
    from character_baker.backends.models import attach_lora
    from character_baker.testing import tiny_model

    model = attach_lora(tiny_model("llama", tiny_tok), LoraConfig(r=4, alpha=8), seed=0)
    pair = tokenize_pair(tiny_tok, {"id": "a", "messages": [{"role": "user", "content": "Hi " * 20}],
                                    "chosen": "Ahoy " * 10, "rejected": "Hello " * 10})
    batch = collate_pairs([pair, pair], 0)
    head = model.get_base_model().get_output_embeddings()
    shapes = []
    head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    token_logps, _ = ResponseScorer(model, chunk_size=8)(batch.input_ids, batch.attention_mask, batch.loss_mask)
    token_logps.sum().backward()
    assert shapes and all(len(shape) == 2 and shape[0] <= 8 for shape in shapes)
    assert token_logps.shape[0] == int(batch.loss_mask[:, 1:].sum())
