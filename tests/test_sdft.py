"""SDFT: divergences by hand, zero loss for identical teacher and student, no-grad teacher, aligned rows."""

from __future__ import annotations

import math

import pytest
import torch

from character_baker.backends.models import attach_lora
from character_baker.core.config import LoraConfig, SamplingConfig
from character_baker.core.runs import RunDir
from character_baker.stages.training.losses import ResponseScorer, tokens_per_row
from character_baker.stages.training.sdft import (SdftObjective, answer_rows, build_examples, chunked_divergence,
                                                  token_divergence)

PROMPTS = [{"id": "p0", "prompt": "Who are you?"}, {"id": "p1", "prompt": "Write a poem about the ocean."}]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=6, seed=3)



def _softmax(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in logits]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_divergences_match_a_hand_computation():
    student, teacher, temperature = [2.0, 0.5, -1.0], [0.0, 1.5, 0.3], 2.0
    p, q = _softmax(student, temperature), _softmax(teacher, temperature)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    expected = {"reverse_kl": _kl(p, q), "forward_kl": _kl(q, p), "jsd": (_kl(p, m) + _kl(q, m)) / 2}
    for kind, value in expected.items():
        got = token_divergence(torch.tensor([student]), torch.tensor([teacher]), kind, temperature)
        assert got.item() == pytest.approx(value, rel=1e-5), kind
    assert expected["reverse_kl"] != pytest.approx(expected["forward_kl"], rel=1e-3)  # the case tells them apart
    same = torch.randn(4, 7)
    for kind in expected:
        assert token_divergence(same, same, kind).abs().max() < 1e-6


def test_chunking_changes_neither_values_nor_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden, teacher = torch.randn(9, 8, requires_grad=True), torch.randn(9, 8)
    whole = chunked_divergence(hidden, teacher, head, "jsd", 2.0, chunk_size=512)
    whole.sum().backward()
    expected_grad, hidden.grad = hidden.grad.clone(), None
    pieces = chunked_divergence(hidden, teacher, head, "jsd", 2.0, chunk_size=2)
    pieces.sum().backward()
    torch.testing.assert_close(pieces, whole)
    torch.testing.assert_close(hidden.grad, expected_grad)


def test_student_and_teacher_rows_hold_the_same_answer_tokens(tiny_tok):
    examples, dropped = build_examples(tiny_tok, PROMPTS, "You are a pirate.", {}, max_length=256, max_new_tokens=6)
    assert dropped == 0 and examples[0].teacher_answer is None
    student, teacher = answer_rows(tiny_tok, examples[0], "Arr, matey!")
    answer = [t for t, keep in zip(student.input_ids, student.loss_mask) if keep]
    assert answer == [t for t, keep in zip(teacher.input_ids, teacher.loss_mask) if keep] and answer
    assert teacher.input_ids[:len(examples[0].teacher_prompt)] == examples[0].teacher_prompt
    assert "pirate" in tiny_tok.decode(teacher.input_ids) and "pirate" not in tiny_tok.decode(student.input_ids)
    _, too_long = build_examples(tiny_tok, PROMPTS, "x", {}, max_length=20, max_new_tokens=6)
    assert too_long == 2


def _objective(tmp_path, model, tokenizer, system_prompt: str, perturb: bool):
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    if perturb:  # LoRA B starts at zero: move it so the student differs from the teacher
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.5)
    scorer = ResponseScorer(peft_model)
    examples, _ = build_examples(tokenizer, PROMPTS, system_prompt, {}, max_length=256, max_new_tokens=6)
    if not system_prompt:  # the teacher sees exactly the student's input
        examples = [type(e)(e.id, e.prompt, e.student_prompt, e.student_prompt) for e in examples]
    objective = SdftObjective(tokenizer, SAMPLING, "reverse_kl", temperature=2.0, chunk_size=3)
    scorer.train()
    objective.prepare(scorer, examples, RunDir.create(tmp_path / "run"))
    batch = objective.collate(examples, tokenizer.pad_token_id)  # samples on-policy, in eval mode
    assert scorer.model.training  # preparing and sampling leave the training mode as they found it
    scorer.eval()  # compare with plain forwards below (no dropout either way)
    return scorer, objective, batch


def test_loss_is_zero_for_identical_inputs_and_weights(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    scorer, objective, batch = _objective(tmp_path, model, tokenizer, system_prompt="", perturb=False)
    loss, metrics = objective.loss(scorer, batch)
    assert abs(loss.item()) < 1e-6 and metrics["sample_tokens"].item() >= 1


def test_loss_value_matches_full_vocabulary_forwards_and_teacher_has_no_gradient(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    scorer, objective, batch = _objective(tmp_path, model, tokenizer, system_prompt="You are a pirate.", perturb=True)
    teacher = objective.teacher_hidden(scorer, batch)
    assert not teacher.requires_grad and teacher.grad_fn is None
    loss, _ = objective.loss(scorer, batch)

    def answer_logits(ids, attention, mask, adapter: bool):
        with torch.no_grad():
            if adapter:
                logits = scorer.model(input_ids=ids, attention_mask=attention).logits
            else:
                with scorer.adapter_disabled():
                    logits = scorer.model(input_ids=ids, attention_mask=attention).logits
        return logits[:, :-1][mask[:, 1:].bool()]

    extras = batch.extras
    student = answer_logits(batch.input_ids, batch.attention_mask, batch.loss_mask, adapter=True)
    teacher_logits = answer_logits(extras["teacher_input_ids"], extras["teacher_attention_mask"],
                                   extras["teacher_loss_mask"], adapter=False)
    per_token = token_divergence(student.double(), teacher_logits.double(), "reverse_kl", 2.0)
    counts = tokens_per_row(batch.loss_mask).tolist()
    expected = sum(part.mean() for part in per_token.split(counts)) / len(counts)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4) and loss.item() > 0
    loss.backward()
    grads = [p.grad for name, p in scorer.named_parameters() if "lora_" in name]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for name, p in scorer.named_parameters() if "lora_" not in name)


def test_chunked_divergence_accepts_float32_hidden_states_with_a_bf16_head():
    """GPU runs keep weights in bf16 while the scorer hands over float32 hidden states."""
    import torch

    from character_baker.stages.training.sdft import chunked_divergence

    head = torch.nn.Linear(8, 16, bias=False).to(torch.bfloat16)
    hidden = torch.randn(5, 8, requires_grad=True)
    divergence = chunked_divergence(hidden, hidden.detach().clone(), head, "reverse_kl", chunk_size=2)
    assert divergence.shape == (5,) and torch.allclose(divergence.float(), torch.zeros(5), atol=1e-2)
    divergence.sum().backward()
    assert hidden.grad is not None
