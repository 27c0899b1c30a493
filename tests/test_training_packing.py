"""Prefix sharing: one row per pair gives the same log-probs, gradients and training as two rows."""

from __future__ import annotations

import pytest
import torch

from character_baker.core.config import LoraConfig
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.stages.training.dpo import can_share_prompt, collate_pairs, score_batch, train_dpo
from character_baker.stages.training.losses import ResponseScorer
from character_baker.stages.training.packing import (CHOSEN, PAD, REJECTED, SHARED, attention_mask_4d,
                                                     collate_shared_prefix, pack_rows, packed_length,
                                                     shared_prefix_length)
from character_baker.stages.training.tokenize import tokenize_pair

RECORDS = [{"id": "a", "messages": [{"role": "user", "content": "Who are you, stranger at the helm?"}],
            "chosen": "Arr, I be the captain of this fine ship!", "rejected": "I am a helpful assistant."},
           {"id": "b", "messages": [{"role": "user", "content": "What is 2 + 2?"}],
            "chosen": "It be 4, matey.", "rejected": "It be four. How can I help you today, friend?"},
           {"id": "c", "messages": [{"role": "user", "content": "Hi"}], "chosen": "Ahoy!", "rejected": "Hello."}]


def _pairs(tokenizer):
    return [tokenize_pair(tokenizer, record) for record in RECORDS]


def _lora_model(tokenizer, arch="llama", attention="sdpa", dtype=torch.float64):
    from character_baker.backends.models import attach_lora
    from character_baker.testing import tiny_model

    model = tiny_model(arch, tokenizer)
    model.config._attn_implementation = attention
    model = attach_lora(model.to(dtype), LoraConfig(r=4, alpha=8), seed=0)
    with torch.no_grad():  # a non-zero adapter, so gradients reach both LoRA matrices
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def test_layout_shares_the_prompt_and_keeps_each_sequences_positions_and_targets(tiny_tok):
    pairs = _pairs(tiny_tok)
    batch = collate_shared_prefix(pairs, pad_token_id=0)
    plain = collate_pairs(pairs, 0)
    for row, pair in enumerate(pairs):
        shared = shared_prefix_length(pair)
        first_trained = pair.chosen.loss_mask.index(1)
        assert shared >= first_trained  # at least the whole prompt is shared
        assert pair.chosen.input_ids[:shared] == pair.rejected.input_ids[:shared]
        length = packed_length(pair)
        assert length == len(pair.chosen) + len(pair.rejected) - shared
        segments = batch.extras["segments"][row].tolist()
        assert segments == ([SHARED] * shared + [CHOSEN] * (len(pair.chosen) - shared)
                            + [REJECTED] * (len(pair.rejected) - shared) + [PAD] * (batch.input_ids.shape[1] - length))
        positions = batch.extras["position_ids"][row, :length].tolist()
        assert positions == list(range(len(pair.chosen))) + list(range(shared, len(pair.rejected)))
        ids = batch.input_ids[row, :length].tolist()
        assert ids == list(pair.chosen.input_ids) + list(pair.rejected.input_ids[shared:])
    # Pair "b": both answers open with "It be", so the shared prefix runs into the responses.
    assert shared_prefix_length(pairs[1]) > pairs[1].chosen.loss_mask.index(1)
    # Labels: every trained token of the two-row layout, in its order [chosen..., rejected...].
    trained = plain.loss_mask[:, 1:].bool()
    assert batch.extras["labels"].tolist() == plain.input_ids[:, 1:][trained].tolist()
    assert batch.extras["row_tokens"].tolist() == plain.loss_mask[:, 1:].sum(1).tolist()
    assert batch.num_tokens == plain.num_tokens == sum(len(p) for p in pairs)
    assert batch.computed_tokens == sum(packed_length(p) for p in pairs) < plain.num_tokens


def test_mask_is_causal_and_rejected_never_sees_chosen():
    segments = torch.tensor([[SHARED, SHARED, CHOSEN, CHOSEN, REJECTED, REJECTED, PAD]], dtype=torch.int8)
    mask = attention_mask_4d(segments, torch.float32, additive=False)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 1, 0, 0],
                             [1, 1, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # padding sees only itself: no empty row
    assert torch.equal(mask, expected)
    additive = attention_mask_4d(segments, torch.float32, additive=True)[0, 0]
    assert torch.equal(additive == 0, expected) and (additive[~expected] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("pack", [False, True], ids=["one-pair-per-row", "packed"])
@pytest.mark.parametrize("arch,attention", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager")])
def test_log_probs_and_gradients_match_the_two_row_layout(tiny_tok, arch, attention, pack):
    pairs = [tokenize_pair(tiny_tok, record) for record in (PACKING_RECORDS if pack else RECORDS)]
    if pack:
        assert collate_pairs(pairs, 0, share_prompt=True, pack=True).input_ids.shape[0] < len(pairs)
    model = _lora_model(tiny_tok, arch, attention)
    scorer = ResponseScorer(model, chunk_size=5)
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        token_logps, counts = score_batch(scorer, collate_pairs(pairs, 0, share_prompt=share, pack=pack and share))
        # a loss that weighs every token differently, so a misplaced token would show
        (token_logps * torch.linspace(0.5, 1.5, len(token_logps), dtype=token_logps.dtype)).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results[share] = (token_logps.detach(), counts, grads)
    (plain, plain_counts, plain_grads), (packed, packed_counts, packed_grads) = results[False], results[True]
    assert torch.equal(plain_counts.cpu(), packed_counts.cpu())
    # float64 weights; the log-softmax runs in float32 by design, hence float32 tolerances
    torch.testing.assert_close(packed, plain, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == packed_grads.keys() and any(g.abs().sum() > 0 for g in plain_grads.values())
    for name in plain_grads:
        torch.testing.assert_close(packed_grads[name], plain_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_attention_without_a_custom_mask_falls_back_to_two_rows(tiny_tok):
    model = _lora_model(tiny_tok)
    assert can_share_prompt(model)
    model.config._attn_implementation = "flash_attention_2"
    assert not can_share_prompt(model)


def test_training_with_and_without_prefix_sharing_gives_the_same_adapter(tmp_path, tiny_tok):
    from character_baker.core.config import DistillConfig
    from character_baker.testing import tiny_model

    records = [dict(r, id=f"{r['id']}{i}") for i in range(2) for r in RECORDS[:2]]
    adapters, logs = {}, {}
    for share in (True, False):
        cfg = DistillConfig(batch_size=2, micro_batch_size=1, learning_rate=2e-3, warmup_ratio=0.0, save_steps=10,
                            max_length=128, lora={"r": 4, "alpha": 8}, share_prompt=share)
        run = RunDir.create(tmp_path / f"share-{share}")
        model = tiny_model("llama", tiny_tok).double()
        train_dpo(run, records, model, tiny_tok, cfg)
        adapters[share] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        logs[share] = read_jsonl(run.path("logs", "distill.jsonl"))
    for name, value in adapters[False].items():
        # float32 log-softmax noise (~1e-7) against LoRA B weights of ~3e-3 after two steps at lr 2e-3
        torch.testing.assert_close(adapters[True][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert [r["loss"] for r in logs[True]] == pytest.approx([r["loss"] for r in logs[False]], rel=1e-6)
    assert [r["tokens"] for r in logs[True]] == [r["tokens"] for r in logs[False]]
    assert all(s["computed_tokens"] < s["tokens"] for s in logs[True])
    assert all(s["computed_tokens"] == s["tokens"] for s in logs[False])


PACKING_RECORDS = RECORDS + [{"id": "d", "messages": [{"role": "user", "content": "Yo"}], "chosen": "Arr.",
                              "rejected": "Hi."},
                             {"id": "e", "messages": [{"role": "user", "content": "Name?"}], "chosen": "Rook, matey.",
                              "rejected": "I am an assistant."}]


def test_packed_rows_hold_several_pairs_each_with_its_own_positions_and_segments(tiny_tok):
    pairs = [tokenize_pair(tiny_tok, record) for record in PACKING_RECORDS]
    lengths = [packed_length(pair) for pair in pairs]
    layout = pack_rows(lengths, pack=True)
    assert sorted(i for row in layout for i in row) == list(range(len(pairs)))
    assert len(layout) < len(pairs) and all(sum(lengths[i] for i in row) <= max(lengths) for row in layout)
    packed, plain = collate_shared_prefix(pairs, 0, pack=True), collate_shared_prefix(pairs, 0)
    assert packed.input_ids.shape == (len(layout), max(lengths))
    assert packed.computed_tokens == plain.computed_tokens and packed.num_tokens == plain.num_tokens
    for row, members in enumerate(layout):
        offset = 0
        for slot, index in enumerate(members):
            pair, shared = pairs[index], shared_prefix_length(pairs[index])
            end = offset + lengths[index]
            assert packed.extras["position_ids"][row, offset:end].tolist() == (
                list(range(len(pair.chosen))) + list(range(shared, len(pair.rejected))))
            segments = packed.extras["segments"][row, offset:end].tolist()
            assert segments == ([3 * slot + SHARED] * shared + [3 * slot + CHOSEN] * (len(pair.chosen) - shared)
                                + [3 * slot + REJECTED] * (len(pair.rejected) - shared))
            offset = end
        assert (packed.extras["segments"][row, offset:] == PAD).all()
    # The labels and row_tokens keep the two-row order, so the loss code reads them unchanged.
    assert packed.extras["labels"].tolist() == plain.extras["labels"].tolist()
    assert packed.extras["row_tokens"].tolist() == plain.extras["row_tokens"].tolist()
    hidden = torch.arange(packed.input_ids.numel())
    assert packed.input_ids.reshape(-1)[hidden[packed.extras["gather"]]].tolist() == \
        plain.input_ids.reshape(-1)[plain.extras["gather"]].tolist()  # each label is predicted from the same token


def test_packed_mask_keeps_pairs_apart():
    # pair 0: shared, chosen, rejected; pair 1: shared, chosen, rejected; padding
    segments = torch.tensor([[0, 1, 2, 3, 4, 5, PAD]], dtype=torch.int16)
    mask = attention_mask_4d(segments, torch.float32, additive=False)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [1, 0, 1, 0, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0],
                             [0, 0, 0, 1, 1, 0, 0],
                             [0, 0, 0, 1, 0, 1, 0],
                             [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_float32_loss_and_gradients_match_the_plain_path(tiny_tok, arch):
    """float32 weights: DPO + NLL + KL of packed rows equals the two-row layout's, gradients too."""
    from character_baker.stages.training.dpo import DpoObjective

    pairs = [tokenize_pair(tiny_tok, record) for record in PACKING_RECORDS]
    model = _lora_model(tiny_tok, arch, "sdpa", dtype=torch.float32)
    scorer = ResponseScorer(model, chunk_size=7)
    results = {}
    for share, pack in ((False, False), (True, True)):
        objective = DpoObjective(beta=0.1, nll_coef=0.1, kl_coef=0.01, share_prompt=share, pack_pairs=pack)
        objective._reference = {key: (chosen * 0.9, rejected * 1.1) for key, (chosen, rejected) in
                                score_reference(scorer, pairs).items()}
        batch = objective.collate(pairs, 0)
        assert (batch.input_ids.shape[0] < len(pairs)) == pack  # packed: fewer rows than pairs
        batch.totals = batch.counts
        model.zero_grad(set_to_none=True)
        loss, metrics = objective.loss(scorer, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results[pack] = (loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads)
    (loss, metrics, grads), (packed_loss, packed_metrics, packed_grads) = results[False], results[True]
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    for key in metrics:
        torch.testing.assert_close(packed_metrics[key], metrics[key], rtol=1e-5, atol=1e-5, msg=key)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)


def score_reference(scorer, pairs):
    """Plain-layout log-probs of every pair (a stand-in reference, shared by both layouts)."""
    from character_baker.stages.training.dpo import score_pairs

    return score_pairs(scorer, pairs, 0, batch_size=len(pairs))


def test_training_with_packed_pairs_gives_the_same_adapter(tmp_path, tiny_tok):
    from character_baker.core.config import DistillConfig
    from character_baker.testing import tiny_model

    records = [dict(r, id=f"{r['id']}{i}") for i in range(2) for r in PACKING_RECORDS if r["id"] != "b"]
    pairs = [tokenize_pair(tiny_tok, record) for record in records]
    assert len(pack_rows([packed_length(pair) for pair in pairs], pack=True)) < len(pairs)  # the one batch packs
    adapters = {}
    for pack in (True, False):
        cfg = DistillConfig(batch_size=8, micro_batch_size=8, learning_rate=2e-3, warmup_ratio=0.0, save_steps=10,
                            max_length=128, lora={"r": 4, "alpha": 8}, pack_pairs=pack)
        model = tiny_model("llama", tiny_tok).double()
        summary = train_dpo(RunDir.create(tmp_path / f"pack-{pack}"), records, model, tiny_tok, cfg)
        adapters[pack] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        assert summary["pairs"] == len(records)
    for name, value in adapters[False].items():
        torch.testing.assert_close(adapters[True][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_flex_mask_rule_equals_the_sdpa_mask_for_packed_rows():
    """The mask_mod the GPU's flex attention uses gives the same dense mask as `attention_mask_4d`."""
    from torch.nn.attention.flex_attention import create_mask

    from character_baker.stages.training.packing import mask_mod

    segments = torch.tensor([[0, 0, 1, 1, 2, 3, 4, 5, 5, PAD, PAD, PAD],
                             [0, 1, 2, 2, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD]], dtype=torch.int16)
    dense = create_mask(mask_mod(segments), 2, None, 12, 12, device="cpu")
    assert torch.equal(dense, attention_mask_4d(segments, torch.float32, additive=False))
