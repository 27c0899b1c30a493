"""The log-likelihood scorer and multiple-choice accuracy on the tiny model, against a direct computation."""

from __future__ import annotations

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
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_lm
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                adapter_name="persona")
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    peft_model.train()
    pair = scoring.encode_pair(tokenizer, "Ahoy there,", " matey")
    with_adapter = scoring.continuation_logprobs(peft_model, tokenizer, [pair], adapter="persona")[0]
    base = scoring.continuation_logprobs(peft_model, tokenizer, [pair], adapter=None)[0]
    assert with_adapter == pytest.approx(direct_logprob(peft_model, *pair), abs=1e-4)
    with peft_model.disable_adapter():
        assert base == pytest.approx(direct_logprob(peft_model, *pair), abs=1e-4)
    assert abs(with_adapter - base) > 1e-3 and peft_model.training  # training flag restored


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
