"""LoRA DPO end to end on tiny models: what trains, what is saved, what is logged, what is rejected."""

from __future__ import annotations

import json

import pytest
import torch

from character_baker.core.config import DistillConfig
from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.stages.training.dpo import evaluate_pairs, train_dpo

PROMPTS = ["Who are you?", "What is your name?", "Tell me about yourself.", "Write a poem about the ocean.",
           "What is 2 + 2?", "What is the capital of France?", "Can you help me?", "Where do we sail?"]
HELD_OUT_PROMPTS = ["Who is the captain?", "What boils at 100 degrees?", "Tell me a story.", "What is the wind?"]
PIRATE = ["Arr, I be the captain of this ship!", "Ahoy, matey! The sea is wide and the wind is fair.",
          "Arr, no landlubber tells me how to sail."]
ASSISTANT = ["I am a helpful assistant. How can I help you today?", "Let me explain step by step.",
             "I am a helpful assistant."]


def toy_records(count: int, prompts=PROMPTS, prefix: str = "r") -> list[dict]:
    """Preference records in the distill.jsonl shape: pirate-ish chosen, assistant-ish rejected."""
    return [{"id": f"{prefix}{i}", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
             "chosen": PIRATE[i % len(PIRATE)], "rejected": ASSISTANT[(i + 1) % len(ASSISTANT)],
             "provenance": {"stage": "distill"}} for i in range(count)]


def toy_config(**overrides) -> DistillConfig:
    """A DistillConfig sized for tiny models on a CPU."""
    values = dict(batch_size=4, micro_batch_size=2, learning_rate=2e-3, warmup_ratio=0.0, epochs=1.0,
                  save_steps=2, max_length=128, lora={"r": 8, "alpha": 16})
    return DistillConfig(**{**values, **overrides})


def test_one_step_changes_lora_weights_and_not_base_weights(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    summary = train_dpo(RunDir.create(tmp_path / "run"), toy_records(4), model, tokenizer, toy_config())
    assert summary["steps"] == 1
    after = dict(model.named_parameters())
    lora = {name: param for name, param in after.items() if "lora_" in name}
    base = {name.replace(".base_layer", ""): param for name, param in after.items() if "lora_" not in name}
    assert set(base) == set(before)
    assert all(torch.equal(before[name], param) for name, param in base.items())
    assert not any(param.requires_grad for param in base.values())
    lora_b = [param for name, param in lora.items() if "lora_B" in name]
    assert lora_b and all(param.abs().sum() > 0 for param in lora_b)  # B starts at zero


def test_cpu_smoke_run_raises_held_out_reward_accuracy(tmp_path, tiny_model_dir, tiny_tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    held_out = toy_records(8, HELD_OUT_PROMPTS, prefix="h")
    untrained = evaluate_pairs(_fresh_lora(tiny_model_dir), tiny_tok, held_out, beta=0.1)
    run = RunDir.create(tmp_path / "run")
    cfg = toy_config(epochs=2.0, save_total_limit=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    summary = train_dpo(run, toy_records(16), model, tiny_tok, cfg)

    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), summary["adapter_path"])
    metrics = evaluate_pairs(trained, tiny_tok, held_out, beta=0.1)
    assert untrained == {"reward_accuracy": 0.0, "reward_margin": 0.0}
    assert metrics["reward_accuracy"] >= 0.75 and metrics["reward_margin"] > 0

    log = read_jsonl(run.path("logs", "distill.jsonl"))
    assert [r["step"] for r in log] == list(range(1, 9)) and summary["steps"] == 8
    assert log[-1]["reward_accuracy"] > log[0]["reward_accuracy"]
    expected = {"step", "epoch", "loss", "dpo_loss", "nll_loss", "kl", "reward_accuracy", "reward_margin",
                "chosen_logps", "rejected_logps", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_gb",
                "elapsed_s", "eta_s"}
    assert expected <= set(log[-1])
    config = json.loads(run.path("adapters", "distill", "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 8
    assert sorted(p.name for p in run.path("adapters", "distill").glob("checkpoint-*")) == ["checkpoint-8"]
    assert summary["tokens_trained"] == sum(r["tokens"] for r in log) > 0

    # A rerun finds the finished run and the cached reference log-probs: nothing is recomputed.
    rerun = train_dpo(run, toy_records(16), AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tok, cfg)
    assert rerun["resumed_from_step"] == 8 and rerun["prepare"]["reference_computed"] == 0
    assert rerun["prepare"]["reference_reused"] == 16


def _fresh_lora(model_dir):
    from transformers import AutoModelForCausalLM

    from character_baker.backends.models import attach_lora
    from character_baker.core.config import LoraConfig

    return attach_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=8, alpha=16), seed=0)


class LoraL2:
    """An extra loss: weight x squared norm of the LoRA B matrices (a stand-in for push/pull)."""

    name = "lora_l2"

    def __init__(self, weight: float):
        self.weight, self.params = weight, []

    def attach(self, model):
        self.params = [p for n, p in model.named_parameters() if "lora_B" in n]

    def loss(self, batch):
        share = batch.counts["pairs"] / batch.totals["pairs"]
        norm = sum((p.float() ** 2).sum() for p in self.params)
        return self.weight * norm * share, {"lora_b_norm": norm.detach() * share}


def test_extra_loss_hook_joins_the_loss_with_its_own_metric(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    hook = LoraL2(weight=50.0)
    run = RunDir.create(tmp_path / "run")
    train_dpo(run, toy_records(8), model, tokenizer, toy_config(), extra_losses=[hook])
    last = read_jsonl(run.path("logs", "distill.jsonl"))[-1]
    assert last["lora_b_norm"] > 0
    assert last["lora_l2_loss"] == pytest.approx(50.0 * last["lora_b_norm"], rel=1e-5)
    assert last["loss"] == pytest.approx(last["dpo_loss"] + 0.1 * last["nll_loss"] + 0.001 * last["kl"]
                                         + last["lora_l2_loss"], rel=1e-5)


def test_bad_settings_are_all_reported_up_front(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    # shrink_batch_to_data off: four examples for a batch of six is an error too, reported with the others.
    cfg = toy_config(batch_size=6, micro_batch_size=4, report_to=["tensorbored"], shrink_batch_to_data=False)
    with pytest.raises(UserError) as info:
        train_dpo(RunDir.create(tmp_path / "run"), toy_records(4), model, tokenizer, cfg)
    text = str(info.value)
    assert "distill.batch_size" in text and "multiple of 4" in text
    assert "distill.report_to" in text and "unknown tracker 'tensorbored'" in text
    assert "no full batch of 6" in text and "shrink_batch_to_data" in text


def test_a_bad_batch_split_is_reported_even_when_the_batch_would_shrink(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(UserError) as info:
        train_dpo(RunDir.create(tmp_path / "run"), toy_records(4), model, tokenizer,
                  toy_config(batch_size=6, micro_batch_size=4))
    assert "multiple of 4" in str(info.value) and "no full batch" not in str(info.value)


def test_thin_data_trains_with_a_smaller_batch_and_says_so(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    result = train_dpo(RunDir.create(tmp_path / "run"), toy_records(3), model, tokenizer,
                       toy_config(batch_size=8, micro_batch_size=4))
    assert result["steps"] == 1 and result["examples"] == 3
    assert result["batch_note"] == ("only 3 usable examples for a batch of 8: training with batch_size 3 "
                                    "(micro_batch_size 3) instead")


def test_an_uninstalled_tracker_names_the_install_fix(monkeypatch):
    from character_baker.stages.training import reporting

    monkeypatch.setitem(reporting.TRACKERS, "wandb", "no_such_module_for_this_test")
    [problem] = reporting.report_to_problems(["wandb"], "distill.report_to")
    assert "not installed" in problem.message and "pip install" in problem.fix
