"""`profile`, `steer`, `push-pull` and `sdft` end to end on the tiny model, and their user errors."""

from __future__ import annotations

import json

import pytest

from character_baker.core.runs import read_jsonl

CONSTITUTION = """\
meta:
  name: mini
persona:
  name: Captain Rook
  identity: A gruff pirate captain who answers plainly.
traits:
  - trait: "I talk like an old sea dog."
    questions: ["Who are you?", "What is your name?"]
  - trait: "I am gruff but kind."
    questions: ["Tell me about yourself.", "Can you help me?"]
"""
# Tiny sizes: the hand-written questions only (no expansion), short answers, two optimiser steps.
TINY = ["prompts.questions_per_trait=2", "generation.teacher.sampling.max_new_tokens=8",
        "generation.student.sampling.max_new_tokens=8", "profile.prompts=4", "sdft.prompts=4", "sdft.batch_size=2",
        "sdft.micro_batch_size=1", "sdft.learning_rate=1e-3"]



@pytest.fixture
def args(tmp_path, tiny_model_dir):
    constitution = tmp_path / "mini.yaml"
    constitution.write_text(CONSTITUTION)

    def build(command: str, *extra: str) -> list[str]:
        sets = [item for value in TINY for item in ("--set", value)]
        return [command, str(constitution), "--preset", "smoke", "--model", str(tiny_model_dir),
                "--run", str(tmp_path / "run"), *sets, *extra]

    return build


def test_profile_steer_push_pull_and_sdft_end_to_end(cli, args, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli(*args("profile"))
    assert code == 0, err
    summary = json.loads((run / "profile" / "summary.json").read_text())
    assert summary["prompts"] == 4 and summary["layers"] == 4 and summary["push_dims"] > 0
    assert f"top layers: {summary['top_layers']}" in out and (run / "profile" / "heatmap.png").is_file()

    code, out, err = cli(*args("steer", "--strengths", "0,4", "--count", "2", "--vector", "pca"))
    assert code == 0, err
    assert "inputs unchanged" in out  # the profile is reused
    assert "strength 0 (pca, layers 0..3)" in out and "strength 4 (pca, layers 0..3)" in out

    code, out, err = cli(*args("push-pull", "--set", "push_pull.stage=sdft", "--set", "push_pull.balance_ratio=0.5"))
    assert code == 0, err
    log = read_jsonl(run / "logs" / "sdft.jsonl")
    assert len(log) == 2 and all("push_pull_loss" in r and "reverse_kl" in r for r in log)
    assert json.loads((run / "manifest.json").read_text())["stages"]["sdft"]["summary"]["push_pull"] is True
    assert (run / "adapters" / "sdft" / "adapter_model.safetensors").is_file()
    assert "push_pull_loss" in out and "sdft adapter, no system prompt" in out

    code, out, err = cli(*args("sdft", "--show", "1"))  # push/pull off: a different stage input, so it retrains
    assert code == 0, err
    log = read_jsonl(run / "logs" / "sdft.jsonl")
    assert len(log) == 2 and not any("push_pull_loss" in r for r in log) and all("ce_loss" in r for r in log)
    assert "reverse_kl" in out and "over 2 steps" in out and (run / "data" / "sdft_teacher.jsonl").is_file()


def test_user_mistakes_exit_2_with_the_fix(cli, args, tmp_path):
    code, _, err = cli(*args("steer", "--strengths", "0,strong"))
    assert code == 2 and "--strengths 0,2,4,8" in err
    code, _, err = cli(*args("steer", "--profile", str(tmp_path / "nowhere.safetensors")))
    assert code == 2 and "no activation profile" in err and "character-baker profile" in err
    code, _, err = cli(*args("push-pull", "--set", "push_pull.profile=" + str(tmp_path / "none.safetensors"),
                             "--set", "push_pull.stage=sdft"))
    assert code == 2 and "no activation profile" in err
