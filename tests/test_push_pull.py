"""Push/pull: the term carries gradient to LoRA, padding never counts, the formulas, the balance."""

from __future__ import annotations

import pytest
import torch

from character_baker.backends.models import attach_lora
from character_baker.core.config import LoraConfig
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.stages.training.batching import Batch, collate_sequences
from character_baker.stages.training.losses import ResponseScorer
from character_baker.stages.training.push_pull import (LayerTargets, PushPullRegulariser, push_pull_rows,
                                                       targets_from_profile)
from character_baker.stages.training.tokenize import tokenize_conversation



def fake_profile(layers: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Profile tensors with a few push and pull dimensions in every layer."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(layers, hidden, generator=generator) * 2
    return {"z": z, "push": (z > 1.5).to(torch.uint8), "pull": (z < -1.5).to(torch.uint8),
            "importance": z.pow(2).mean(-1).sqrt(), "layer_scale": torch.linspace(1.0, 4.0, layers)}


def _sequences(tokenizer, answers):
    return [tokenize_conversation(tokenizer, [{"role": "user", "content": f"Question {i}?"},
                                              {"role": "assistant", "content": answer}], f"r{i}", last_turn_only=True)
            for i, answer in enumerate(answers)]


def _term(scorer, regulariser, batch: Batch) -> torch.Tensor:
    scorer(batch.input_ids, batch.attention_mask, batch.loss_mask)
    term, _ = regulariser.loss(batch)
    return term


@pytest.fixture
def lora_scorer(tiny_lm):
    model, tokenizer = tiny_lm
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    regulariser = PushPullRegulariser(targets_from_profile(fake_profile(4, model.config.hidden_size)), weight=0.1)
    regulariser.attach(peft_model)
    return ResponseScorer(peft_model), regulariser, tokenizer


def test_term_has_gradient_on_lora_weights(lora_scorer):
    scorer, regulariser, tokenizer = lora_scorer
    batch = collate_sequences(_sequences(tokenizer, ["Arr, matey!", "I am a helpful assistant."]), 0)
    batch.counts = {"sequences": 2.0}
    term = _term(scorer, regulariser, batch)
    assert term.requires_grad and term.item() > 0
    term.backward()
    lora_b = [p.grad for name, p in scorer.named_parameters() if "lora_B" in name]
    assert lora_b and any(grad is not None and grad.abs().sum() > 0 for grad in lora_b)
    assert all(p.grad is None for name, p in scorer.named_parameters() if "lora_" not in name)


def test_padding_and_prompt_never_contribute(lora_scorer):
    scorer, regulariser, tokenizer = lora_scorer
    sequences = _sequences(tokenizer, ["Arr!", "Ahoy matey, the sea is wide and the wind is fair."])
    singles = [_term(scorer, regulariser, collate_sequences([s], 0)).item() for s in sequences]
    padded = collate_sequences(sequences, 0)
    assert padded.attention_mask[0].sum() < padded.attention_mask.shape[1]  # the first row is padded
    together = _term(scorer, regulariser, padded).item()
    padded.input_ids[0, len(sequences[0]):] = 7  # other ids in the padding: same term
    repadded = _term(scorer, regulariser, padded).item()
    assert together == pytest.approx(sum(singles) / 2, rel=1e-5)
    assert repadded == pytest.approx(together, rel=1e-6)


def test_no_grad_passes_are_not_captured(lora_scorer):
    scorer, regulariser, tokenizer = lora_scorer
    first = collate_sequences(_sequences(tokenizer, ["Arr!"]), 0)
    other = collate_sequences(_sequences(tokenizer, ["Hello there, I am an assistant."]), 0)
    scorer(first.input_ids, first.attention_mask, first.loss_mask)
    with torch.no_grad(), scorer.adapter_disabled():  # a reference/teacher pass in between
        scorer(other.input_ids, other.attention_mask, other.loss_mask)
    term, _ = regulariser.loss(first)
    assert term.requires_grad  # still the graph of the grad-enabled forward, and its shapes match `first`
    with pytest.raises(RuntimeError, match="captured no activations"):
        regulariser.loss(first)  # consumed: a term is never computed twice from one forward


def test_published_and_z_weighted_forms_by_hand():
    means = {0: torch.tensor([[-1.0, 2.0, 3.0], [1.0, -4.0, 0.5]]), 1: torch.tensor([[-2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])}
    targets = [LayerTargets(0, torch.tensor([0, 1]), torch.full((2,), 1 / 3), torch.tensor([2]), torch.full((1,), 1 / 2), 1.0),
               LayerTargets(1, torch.tensor([0]), torch.full((1,), 1 / 3), torch.tensor([2]), torch.full((1,), 1 / 2), 1.0)]
    push, pull = push_pull_rows(means, targets)
    # Row 0: push dims -1, 2, -2 -> relu(-a) 1, 0, 2 -> mean 1; pull dims 3, 1 -> squares 9, 1 -> mean 5.
    # Row 1: push dims 1, -4, 0 -> 0, 4, 0 -> mean 4/3; pull dims 0.5, 0 -> 0.25, 0 -> mean 0.125.
    torch.testing.assert_close(push, torch.tensor([1.0, 4 / 3]))
    torch.testing.assert_close(pull, torch.tensor([5.0, 0.125]))

    profile = {"z": torch.tensor([[3.0, 1.0, -2.0], [0.0, 4.0, -1.0]]), "push": torch.tensor([[1, 1, 0], [0, 1, 0]]),
               "pull": torch.tensor([[0, 0, 1], [0, 0, 1]]), "importance": torch.tensor([1.0, 2.0]),
               "layer_scale": torch.tensor([2.0, 4.0])}
    weighted = targets_from_profile(profile, "z_weighted")
    # Per layer, |z| weights sum to 1 over the set; layers averaged (2 layers hold push dims) -> 1/2 per layer.
    torch.testing.assert_close(weighted[0].push_weight, torch.tensor([3 / 8, 1 / 8]))
    assert [t.scale for t in weighted] == [2.0, 4.0]
    push, pull = push_pull_rows({0: torch.tensor([[-2.0, -2.0, 2.0]]), 1: torch.tensor([[0.0, -4.0, 4.0]])}, weighted)
    # Layer 0: a/s = -1, -1 (push), 1 (pull); layer 1: -1 (push), 1 (pull): every relu and square is 1.
    torch.testing.assert_close(push, torch.tensor([1.0]))
    torch.testing.assert_close(pull, torch.tensor([1.0]))
    assert [t.layer for t in targets_from_profile(profile, "published", top_layers=1)] == [1]


def test_balance_holds_the_configured_ratio_during_dpo(tmp_path, tiny_lm):
    from tests.test_training_dpo import toy_config, toy_records

    from character_baker.stages.training.dpo import train_dpo
    from character_baker.stages.training.push_pull import balance_callbacks

    model, tokenizer = tiny_lm
    regulariser = PushPullRegulariser(targets_from_profile(fake_profile(4, model.config.hidden_size), "z_weighted"),
                                      weight=0.1, balance_ratio=0.25)
    run = RunDir.create(tmp_path / "run")
    train_dpo(run, toy_records(16), model, tokenizer, toy_config(learning_rate=1e-4), extra_losses=[regulariser],
              callbacks=balance_callbacks([regulariser]))
    log = read_jsonl(run.path("logs", "distill.jsonl"))
    assert len(log) == 4
    assert log[0]["push_pull_coef"] == pytest.approx(0.1)  # the first step starts at `weight`
    ratios = [r["push_pull_loss"] / (r["loss"] - r["push_pull_loss"]) for r in log[1:]]
    assert ratios == pytest.approx([0.25] * 3, rel=0.05)
    assert all(r["push_raw"] + r["pull_raw"] > 0 for r in log)


def test_a_checkpoint_trained_with_the_regulariser_resumes_only_with_it(tmp_path, tiny_lm):
    from tests.test_training_dpo import toy_config, toy_records

    from character_baker.stages.training.dpo import train_dpo
    from character_baker.testing import tiny_model

    _, tokenizer = tiny_lm
    run = RunDir.create(tmp_path / "run")

    def train(with_term: bool) -> dict:
        model = tiny_model(tokenizer=tokenizer)
        extra = [PushPullRegulariser(targets_from_profile(fake_profile(4, model.config.hidden_size)), weight=0.1)]
        return train_dpo(run, toy_records(16), model, tokenizer, toy_config(learning_rate=1e-4),
                         extra_losses=extra if with_term else [])

    assert train(True)["resumed_from_step"] == 0
    assert train(True)["resumed_from_step"] == 4  # same objective and term: the last checkpoint is taken up
    assert train(False)["resumed_from_step"] == 0  # without the term it is another run
