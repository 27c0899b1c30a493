"""The DPO reference pass: the base model's log-probs of every pair, computed eagerly in batches."""

from __future__ import annotations

import torch

from character_baker.stages.training.dpo import reference_logps, score_pairs
from character_baker.stages.training.losses import ResponseScorer, attention_implementation
from character_baker.stages.training.tokenize import tokenize_preferences
from tests.test_training_dpo import ASSISTANT, PIRATE, toy_records


def _records() -> list[dict]:
    """Pairs of varied lengths (varied padding and shared prefixes) in the distill.jsonl shape."""
    records = toy_records(5)
    records[1]["rejected"] = PIRATE[1] + " " + ASSISTANT[0]  # shares an opening with its chosen answer
    records[3]["chosen"] = "Arr."
    return records


def _scorer(tokenizer) -> tuple[ResponseScorer, torch.nn.Module]:
    """A float32 tiny Llama with a non-zero LoRA adapter (so an adapter left on would change every log-prob)."""
    from character_baker.backends.models import attach_lora
    from character_baker.core.config import LoraConfig
    from character_baker.testing import tiny_model

    model = attach_lora(tiny_model("llama", tokenizer).float(), LoraConfig(r=4, alpha=8), seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return ResponseScorer(model, chunk_size=5), model


def _plain_reference(model: torch.nn.Module, pairs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One sequence at a time: log_softmax(base model(input_ids)) at every trained token."""
    scores = {}
    with torch.no_grad(), model.disable_adapter():
        for pair in pairs:
            sides = []
            for sequence in (pair.chosen, pair.rejected):
                ids = torch.tensor([sequence.input_ids])
                logps = model(input_ids=ids).logits[0].float().log_softmax(-1)
                trained = [i for i in range(1, len(sequence)) if sequence.loss_mask[i]]
                sides.append(torch.stack([logps[i - 1, sequence.input_ids[i]] for i in trained]))
            scores[pair.id] = tuple(sides)
    return scores


def test_reference_pass_equals_the_plain_per_sequence_forward_and_compiles_nothing(tmp_path, tiny_tok):
    from torch._dynamo.testing import CompileCounter

    scorer, model = _scorer(tiny_tok)
    pairs, _ = tokenize_preferences(tiny_tok, _records(), max_length=128)
    expected = _plain_reference(model, pairs)
    counter = CompileCounter()  # counts the graphs dynamo compiles, runs them eagerly
    for layer in model.get_base_model().get_decoder().layers:
        layer.compile(backend=counter)
    for share_prompt in (True, False):
        cache, computed = reference_logps(scorer, pairs, tmp_path / f"ref-{share_prompt}.safetensors", 0,
                                          batch_size=2, share_prompt=share_prompt, pack=share_prompt)
        assert computed == len(pairs)
        by_id = {key.split(":")[0]: value for key, value in cache.items()}
        for pair in pairs:
            for got, want in zip(by_id[pair.id], expected[pair.id]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=pair.id)
    assert counter.frame_count == 0  # the compiled layers ran eagerly
    assert model.training  # handed back in training mode
    scorer(torch.tensor([pairs[0].chosen.input_ids]), torch.ones(1, len(pairs[0].chosen), dtype=torch.long),
           torch.tensor([pairs[0].chosen.loss_mask]))
    assert counter.frame_count > 0  # and compile again afterwards (training)


def test_reference_pass_runs_a_flex_attention_model_through_sdpa_and_switches_back(tiny_tok):
    scorer, model = _scorer(tiny_tok)
    model.get_base_model().config._attn_implementation = "flex_attention"  # what the trainer sets on a GPU
    seen = []
    first_layer = model.get_base_model().get_decoder().layers[0]
    first_layer.register_forward_pre_hook(lambda *_: seen.append(attention_implementation(model)))
    pairs, _ = tokenize_preferences(tiny_tok, _records(), max_length=128)
    score_pairs(scorer, pairs, 0, batch_size=3, adapter=False, share_prompt=True)
    assert seen and set(seen) == {"sdpa"}
    assert attention_implementation(model) == "flex_attention"
