"""A killed training run resumes from its last complete checkpoint and ends where a straight run ends."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from character_baker.core.runs import RunDir, read_jsonl
from character_baker.stages.training.dpo import train_dpo
from character_baker.testing import tiny_model
from tests.test_training_dpo import toy_config, toy_records


class Killed(Exception):
    """Stands in for SIGKILL in the middle of training."""


def kill_at(step: int):
    def callback(record: dict) -> None:
        if record["step"] == step:
            raise Killed(step)
    return callback


OFFLOAD = dict(offload_optimizer=True, offload_activations=True, offload_embeddings=True, gradient_checkpointing=True)


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offloaded"])
def test_four_steps_straight_equal_two_steps_kill_and_two_more(tmp_path, tiny_tok, offload):
    # Dropout, warm-up and a cosine schedule make the RNG, scheduler and optimizer state matter;
    # 8 pairs in batches of 4 over 2 epochs put the resume point on an epoch boundary. Offloaded:
    # the CPU masters and CPU optimizer state are what is saved and restored.
    cfg = toy_config(epochs=2.0, warmup_ratio=0.5, lr_scheduler="cosine", lora={"r": 8, "alpha": 16, "dropout": 0.1},
                     **(OFFLOAD if offload else {}))
    records = toy_records(8)

    straight = RunDir.create(tmp_path / "straight")
    train_dpo(straight, records, tiny_model("llama", tiny_tok), tiny_tok, cfg)

    resumed = RunDir.create(tmp_path / "resumed")
    with pytest.raises(Killed):
        train_dpo(resumed, records, tiny_model("llama", tiny_tok), tiny_tok, cfg, callbacks=[kill_at(3)])
    stage_dir = resumed.path("adapters", "distill")
    assert sorted(p.name for p in stage_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (stage_dir / "adapter_model.safetensors").exists()
    (stage_dir / "checkpoint-3").mkdir()        # killed before its marker was written
    (stage_dir / "checkpoint-4.tmp").mkdir()    # killed mid-write

    summary = train_dpo(resumed, records, tiny_model("llama", tiny_tok), tiny_tok, cfg)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4

    expected = load_file(straight.path("adapters", "distill", "adapter_model.safetensors"))
    actual = load_file(stage_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    straight_log = read_jsonl(straight.path("logs", "distill.jsonl"))
    resumed_log = read_jsonl(resumed.path("logs", "distill.jsonl"))
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4]
    for a, b in zip(straight_log, resumed_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["learning_rate"] == b["learning_rate"]
    assert straight_log[2]["loss"] != straight_log[1]["loss"]  # the steps differ, so equality means something


def test_checkpoints_of_other_data_are_not_resumed(tmp_path, tiny_tok):
    run = RunDir.create(tmp_path / "run")
    cfg = toy_config(epochs=1.0)
    train_dpo(run, toy_records(8), tiny_model("llama", tiny_tok), tiny_tok, cfg)
    other = train_dpo(run, toy_records(8, prefix="other"), tiny_model("llama", tiny_tok), tiny_tok, cfg)
    assert other["resumed_from_step"] == 0 and other["prepare"]["reference_computed"] == 8
