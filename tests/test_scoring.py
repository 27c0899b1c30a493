"""The log-likelihood scorer and multiple-choice accuracy on the tiny model, against a direct computation."""

from __future__ import annotations

import os

import pytest
import torch

from character_baker.backends import scoring
from character_baker.core import assets

ITEMS = [{"category": "knowledge", "question": "What is the capital of France?", "choices": ["Paris", "a fox", "4"],
          "answer": 0},
         {"category": "arithmetic", "question": "What is 2 + 2?", "choices": ["4", "22", "the sea"], "answer": 0},
         {"category": "reading", "passage": "Arr, the ship is red.", "question": "What colour is the ship?",
          "choices": ["red", "blue"], "answer": 0}]


def direct_logprob(model, context, continuation) -> float:
    """Sum of log p(continuation | context) from the full logits of one unpadded row."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(log_probs[len(context) - 1 + i, token] for i, token in enumerate(continuation)))


def one_row_per_pair(model, tokenizer, pairs, batch_size=16) -> list[float]:
    """The scorer before contexts were shared: every pair its own right-padded row, full logits, length-sorted batches."""
    order = sorted(range(len(pairs)), key=lambda index: sum(map(len, pairs[index])))
    scores = [0.0] * len(pairs)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = [pairs[i][0] + pairs[i][1] for i in chunk]
        width = max(map(len, rows))
        ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, index in enumerate(chunk):
            context, continuation = pairs[index]
            scores[index] = float(sum(log_probs[row, len(context) - 1 + i, token] for i, token in enumerate(continuation)))
    return scores


def persona_lora(model):
    """The model wrapped with a LoRA adapter 'persona' whose B matrices are random (so it changes the scores)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                adapter_name="persona")
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return peft_model


def mixed_pairs(tokenizer) -> list:
    """Shared and unshared contexts of different lengths, one a prefix of another, a repeated pair, interleaved."""
    text = [("The sea is", " wide"), ("Who are you? I am", " a helpful assistant"), ("The sea is", " blue and deep"),
            ("1 2 3", " 4 5 6 7 8"), ("The sea is wide and", " deep"), ("The sea is", " 4"),
            ("Who are you? I am", " Rook"), ("The sea is", " wide")]
    pairs = [scoring.encode_pair(tokenizer, context, continuation) for context, continuation in text]
    chat = chat_pairs(tokenizer)
    return [pair for two in zip(pairs, chat) for pair in two] + chat[len(pairs):]


def chat_pairs(tokenizer) -> list:
    """The choices of ITEMS as chats with one system prompt: every context starts with the same system turn."""
    return [pair for item in ITEMS for pair in scoring.mc_pairs(tokenizer, item, "You are Captain Rook.")]


def embedded_tokens(model) -> list[int]:
    """A list that grows by the number of token positions each forward pass embeds."""
    counts: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: counts.append(args[0].numel()))
    return counts


def test_encode_pair_follows_lm_eval(tiny_tok):
    context_ids, continuation_ids = scoring.encode_pair(tiny_tok, "Question: where?\nAnswer: ", "Paris")
    assert tiny_tok.decode(context_ids) == "Question: where?\nAnswer:"  # trailing space moved ...
    assert tiny_tok.decode(continuation_ids) == " Paris"  # ... to the continuation
    kept, label = scoring.encode_pair(tiny_tok, "Who?\n", "curious", move_whitespace=False)
    assert tiny_tok.decode(kept) == "Who?\n" and tiny_tok.decode(label) == "curious"


def test_scores_match_a_direct_computation_in_any_batch_and_vocabulary_chunk(tiny_lm):
    model, tokenizer = tiny_lm
    pairs = [scoring.encode_pair(tokenizer, context, continuation) for context, continuation in
             [("The sea is", " wide"), ("Who are you? I am", " a helpful assistant"), ("1 2 3", " 4 5 6 7 8")]]
    expected = [direct_logprob(model, *pair) for pair in pairs]
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    for batch_size, chunk in ((1, 8192), (2, 7), (3, 100)):
        got = scoring.continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, vocab_chunk=chunk)
        assert got == pytest.approx(expected, abs=1e-4)
    assert not calls  # the full output head (a [rows, seq, vocab] matrix) is never run
    with pytest.raises(ValueError, match="non-empty"):
        scoring.continuation_logprobs(model, tokenizer, [([1, 2], [])])


def test_adapter_switch_scores_the_named_weights(tiny_lm):
    model, tokenizer = tiny_lm
    peft_model = persona_lora(model)
    peft_model.train()
    pair = scoring.encode_pair(tokenizer, "Ahoy there,", " matey")
    with_adapter = scoring.continuation_logprobs(peft_model, tokenizer, [pair], adapter="persona")[0]
    base = scoring.continuation_logprobs(peft_model, tokenizer, [pair], adapter=None)[0]
    assert with_adapter == pytest.approx(direct_logprob(peft_model, *pair), abs=1e-4)
    with peft_model.disable_adapter():
        assert base == pytest.approx(direct_logprob(peft_model, *pair), abs=1e-4)
    assert abs(with_adapter - base) > 1e-3 and peft_model.training  # training flag restored


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("weights", ["plain", "adapter off", "adapter on"])
def test_shared_contexts_score_as_a_direct_computation(tiny_lm, attention, weights):
    model, tokenizer = tiny_lm
    model.set_attn_implementation(attention)
    if weights != "plain":
        model = persona_lora(model)
    adapter = "persona" if weights == "adapter on" else None
    assert scoring.shares_contexts(model) and model.config._attn_implementation == attention
    for pairs in (mixed_pairs(tokenizer), chat_pairs(tokenizer)):  # no common prefix; a shared system turn
        with model.disable_adapter() if weights == "adapter off" else torch.no_grad():
            expected = [direct_logprob(model, *pair) for pair in pairs]
        for batch_size, chunk in ((1, 8192), (2, 7), (3, 100), (100, 8192)):
            got = scoring.continuation_logprobs(model, tokenizer, pairs, adapter=adapter, batch_size=batch_size,
                                                vocab_chunk=chunk)
            assert got == pytest.approx(expected, abs=1e-4)


def test_each_context_runs_once_and_the_shared_prefix_once_per_call(tiny_lm):
    model, tokenizer = tiny_lm
    counts = embedded_tokens(model)
    pairs = chat_pairs(tokenizer)
    contexts = {tuple(context): [] for context, _ in pairs}
    for context, continuation in pairs:
        contexts[tuple(context)].append(continuation)
    prefix = len(os.path.commonprefix([list(c) for c in contexts]))
    rows = sorted(len(c) + sum(map(len, conts)) - prefix for c, conts in contexts.items())
    assert prefix > 10 and len(contexts) == len(ITEMS)
    scoring.continuation_logprobs(model, tokenizer, pairs, batch_size=1)
    assert counts == [prefix] + rows  # the system turn once, then each context once with its choices
    counts.clear()
    scoring.continuation_logprobs(model, tokenizer, pairs, batch_size=len(ITEMS))
    assert counts == [prefix, len(ITEMS) * max(rows)]  # one batch of right-padded rows


def test_many_long_continuations_of_one_context_split_into_rows(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    monkeypatch.setattr(scoring, "BRANCH_TOKENS", 6)
    pairs = [scoring.encode_pair(tokenizer, "Ahoy", text) for text in
             (" matey, the sea is wide", " 1 2 3 4 5 6 7 8", " x", " the ship is red and the sea is blue", " y")]
    rows = scoring.context_rows(pairs)
    assert len(rows) > 1 and sorted(i for row in rows for i in row.indices) == list(range(len(pairs)))
    assert all(len(row.continuations) == 1 or row.branch_tokens <= 6 for row in rows)
    expected = [direct_logprob(model, *pair) for pair in pairs]
    for batch_size in (1, 2, 10):
        got = scoring.continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-4)


def test_attention_without_custom_masks_scores_one_row_per_pair(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    sliding = type(model.config)(**{**model.config.to_dict(), "use_sliding_window": True, "sliding_window": 4096})
    assert not scoring.shares_contexts(type(model)(sliding))
    monkeypatch.setattr(scoring, "shares_contexts", lambda model: False)
    pairs = mixed_pairs(tokenizer)
    expected = [direct_logprob(model, *pair) for pair in pairs]
    counts = embedded_tokens(model)
    assert scoring.continuation_logprobs(model, tokenizer, pairs, batch_size=1) == pytest.approx(expected, abs=1e-4)
    assert counts == [len(context) + len(continuation) for context, continuation in
                      sorted(pairs, key=lambda pair: sum(map(len, pair)))]


def test_real_items_score_as_the_one_row_per_pair_scorer(tiny_lm):
    model, tokenizer = tiny_lm
    items = assets.calibration_items()
    results = scoring.score_multiple_choice(model, tokenizer, items, system_prompt="You are Captain Rook.")
    pairs = [scoring.mc_pairs(tokenizer, item, "You are Captain Rook.") for item in items]
    reference = one_row_per_pair(model, tokenizer, [pair for group in pairs for pair in group])
    start = 0
    for item, result in zip(items, results):
        sums = reference[start:start + len(item["choices"])]
        start += len(item["choices"])
        assert result.loglikelihoods == pytest.approx(sums, abs=1e-4)
        normalised = [s / len(c) for s, c in zip(sums, item["choices"])]
        assert (result.predicted, result.predicted_norm) == (max(range(len(sums)), key=sums.__getitem__),
                                                             max(range(len(sums)), key=normalised.__getitem__))


def test_multiple_choice_predictions_are_acc_and_acc_norm(tiny_lm):
    model, tokenizer = tiny_lm
    results = scoring.score_multiple_choice(model, tokenizer, ITEMS, system_prompt="You are Captain Rook.",
                                            batch_size=4)
    for item, result in zip(ITEMS, results):
        pairs = scoring.mc_pairs(tokenizer, item, "You are Captain Rook.")
        assert tokenizer.decode(pairs[0][0]).endswith("assistant\nAnswer:")
        assert [tokenizer.decode(c) for _, c in pairs] == [" " + choice for choice in item["choices"]]
        sums = [direct_logprob(model, *pair) for pair in pairs]
        assert result.loglikelihoods == pytest.approx(sums, abs=1e-4)
        assert result.predicted == max(range(len(sums)), key=sums.__getitem__)
        normalised = [s / len(c) for s, c in zip(sums, item["choices"])]
        assert result.predicted_norm == max(range(len(sums)), key=normalised.__getitem__)
    accuracy = scoring.mc_accuracy(results)
    assert accuracy["mc_accuracy"]["n"] == 3
    assert accuracy["mc_accuracy"]["value"] == pytest.approx(sum(r.predicted == r.answer for r in results) / 3)
    assert accuracy["by_category"]["reading"]["chance"] == 0.5 and accuracy["chance"] == pytest.approx(
        (1 / 3 + 1 / 3 + 1 / 2) / 3)
    scripted = [scoring.ChoiceResult("x", (0.0, -1.0), 0, 1, 0), scoring.ChoiceResult("x", (0.0, -1.0), 0, 0, 1)]
    assert scoring.mc_accuracy(scripted)["mc_accuracy"]["value"] == 0.5
    assert scoring.mc_accuracy(scripted)["mc_accuracy_norm"]["value"] == 0.0


def test_shipped_items_are_our_own_and_well_formed():
    items = assets.multiple_choice_items()
    assert len(items) >= 300 and len({item["id"] for item in items}) == len(items)
    assert {item["category"] for item in items} == set(assets.MC_CATEGORIES)
    for item in items:
        assert 2 <= len(item["choices"]) == len(set(item["choices"])) and 0 <= item["answer"] < len(item["choices"])
    assert all(item.get("passage") for item in items if item["category"] == "reading")
    positions = [item["answer"] for item in items if len(item["choices"]) == 4]
    assert max(positions.count(p) for p in range(4)) < 0.35 * len(positions)  # the right answer is not always first
