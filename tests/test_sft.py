"""SFT on the distilled model: assistant-turn masks turn by turn, the exact loss, and a training run."""

from __future__ import annotations

import json

import pytest
import torch

from character_baker.core.config import IntrospectConfig, ModelsConfig
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.stages.training.losses import ResponseScorer
from character_baker.stages.training.sft import SftObjective, load_distilled_model, train_sft
from character_baker.stages.training.tokenize import tokenize_conversations
from character_baker.stages.training.trainer import sum_counts
from tests.test_merge import save_random_adapter
from tests.test_training_tokenize import masked_spans

ASSISTANT_TURNS = ["Arr, I be thinking of the sea.", "The wind and the crew, matey.", "Aye, the stars guide me home."]


def transcript(index: int = 0) -> dict:
    """A self-interaction record as the introspect data stage stores it: short system prompt, user first."""
    messages = [{"role": "system", "content": "You are Captain Rook, talking with another instance of yourself."}]
    for turn, answer in enumerate(ASSISTANT_TURNS):
        messages.append({"role": "user", "content": f"Who are you, really? ({index}.{turn})"})
        messages.append({"role": "assistant", "content": answer})
    return {"id": f"t{index}", "kind": "interaction", "messages": messages}



def test_mask_covers_each_assistant_turn_in_order_and_nothing_else(tiny_tok):
    sequences, dropped = tokenize_conversations(tiny_tok, [transcript()], max_length=10_000)
    batch = SftObjective().collate(sequences, tiny_tok.pad_token_id)
    [sequence] = sequences
    spans = masked_spans(sequence)
    assert dropped == 0 and batch.loss_mask[0].tolist() == list(sequence.loss_mask)
    assert [tiny_tok.decode(sequence.input_ids[start:end]) for start, end in spans] == \
        [f"{answer}<|im_end|>" for answer in ASSISTANT_TURNS]
    unmasked = tiny_tok.decode([t for t, m in zip(sequence.input_ids, sequence.loss_mask) if not m])
    assert "talking with another instance" in unmasked and all(f"({0}.{turn})" in unmasked for turn in range(3))
    assert batch.counts == {"sequences": 1.0, "tokens": float(sum(sequence.loss_mask))}


def test_loss_is_the_global_mean_nll_over_assistant_tokens(tiny_lm):
    model, tokenizer = tiny_lm
    sequences, _ = tokenize_conversations(tokenizer, [transcript(0), transcript(1), transcript(2)], 10_000)
    objective, scorer = SftObjective(), ResponseScorer(model)
    totals = sum_counts([objective.counts(s) for s in sequences])
    micro = [objective.collate(sequences[:1], tokenizer.pad_token_id), objective.collate(sequences[1:], 0)]
    with torch.no_grad():
        total = 0.0
        for batch in micro:
            batch.totals = totals
            loss, metrics = objective.loss(scorer, batch)
            total += float(loss)
        expected_sum, tokens = 0.0, 0
        for sequence in sequences:
            ids = torch.tensor([sequence.input_ids])
            logps = model(ids).logits[0, :-1].float().log_softmax(-1)
            trained = torch.tensor(sequence.loss_mask[1:]).bool()
            expected_sum -= float(logps[trained].gather(-1, ids[0, 1:][trained][:, None]).sum())
            tokens += int(trained.sum())
    assert total == pytest.approx(expected_sum / tokens, rel=1e-5)


def test_sft_trains_a_lora_on_the_distilled_model(tmp_path, tiny_model_dir, tiny_tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = RunDir.create(tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_random_adapter(base, run.path("adapters", "distill"), seed=3)
    models = ModelsConfig(base=str(tiny_model_dir), device="cpu")
    distilled, tokenizer = load_distilled_model(run, models)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(run.path("adapters", "distill")))(ids).logits
        torch.testing.assert_close(distilled(ids).logits, expected, rtol=1e-4, atol=1e-5)

    cfg = IntrospectConfig(batch_size=4, micro_batch_size=2, learning_rate=3e-3, warmup_ratio=0.0, epochs=3.0,
                           max_length=256, save_steps=2, lora={"r": 8, "alpha": 16})
    summary = train_sft(run, [transcript(i) for i in range(4)], distilled, tokenizer, cfg, base_model=str(tiny_model_dir))
    log = read_jsonl(run.path("logs", "introspect.jsonl"))
    assert summary["steps"] == 3 and [r["step"] for r in log] == [1, 2, 3]
    assert log[-1]["nll_loss"] < log[0]["nll_loss"] and log[0]["loss"] == pytest.approx(log[0]["nll_loss"])
    config = json.loads(run.path("adapters", "introspect", "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 8
