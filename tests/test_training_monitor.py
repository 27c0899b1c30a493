"""The training monitor: held-out answers every N steps, the best eligible check kept, early stopping."""

from __future__ import annotations

import json

import pytest

from character_baker.core.config import DistillConfig, MonitorConfig
from character_baker.core.persona_scorer import PersonaScorer
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.stages.training.monitor import BEST_FOLDER, Check, TrainingMonitor

LOOP = "arr arr arr arr arr arr arr arr arr arr arr arr arr arr"


def _monitor(tmp_path, scripted, cfg=None, scorer=None):
    """A monitor whose answers come from `scripted[step]` (adapter on) or plain text (adapter off)."""
    calls = {"step": 0}

    def answer(model, prompts, adapter_on):
        return list(scripted[calls["step"]]) if adapter_on else ["Here is a plain answer."] * len(prompts)

    monitor = TrainingMonitor(cfg or MonitorConfig(every=1, patience=2, looping_tolerance=0.0), ["p1", "p2"], answer,
                              scorer, tmp_path)
    return monitor, calls


def test_the_best_check_is_the_most_in_character_one_that_does_not_loop(tmp_path):
    scorer = PersonaScorer.fit(["arr matey the sea"] * 20, ["here is a plain answer"] * 20)
    scripted = {1: ["here is a plain answer", "here is a plain answer"],
                2: ["arr matey the sea", "here is a plain answer"],
                3: ["arr matey the sea", LOOP],  # more in character, but loops: not eligible
                4: ["here is a plain answer", LOOP]}
    monitor, calls = _monitor(tmp_path, scripted, scorer=scorer)
    monitor.resume(0, "run")
    monitor.measure_base(model=None)
    assert monitor.base_looping == 0.0
    for step in (1, 2, 3, 4):
        calls["step"] = step
        monitor.check(None, step)
    assert [c.eligible for c in monitor.checks] == [True, True, False, False]
    assert monitor.best().step == 2
    assert monitor.should_stop()  # checks 3 and 4 came after the best one
    state = json.loads((tmp_path / "monitor.json").read_text())
    assert state["best_step"] == 2 and len(state["checks"]) == 4


def test_a_later_check_within_one_standard_error_of_the_top_is_the_best(tmp_path):
    """Scores are means over a few sampled answers: a hair lower later is the same within noise."""
    monitor, _ = _monitor(tmp_path, {})
    monitor.checks = [Check(5, 0.9438, 0.0, True, 0.03), Check(10, 0.9378, 0.0, True, 0.04),
                      Check(12, 0.80, 0.0, True, 0.02)]
    assert monitor.best().step == 10  # 0.9378 >= 0.9438 - 0.03; step 12 is below the floor
    assert not monitor.should_stop()  # patience 2: only step 12 came after the best
    monitor.checks.append(Check(14, 0.99, 0.2, False, 0.01))  # higher, but loops: never the best
    assert monitor.best().step == 10
    exact = [Check(5, 0.9438, 0.0, True), Check(10, 0.9378, 0.0, True)]  # no error recorded: the plain maximum
    monitor.checks = exact
    assert monitor.best().step == 5


def test_a_check_records_the_standard_error_of_its_mean_score(tmp_path):
    scorer = PersonaScorer.fit(["arr matey the sea"] * 20, ["here is a plain answer"] * 20)
    monitor, calls = _monitor(tmp_path, {1: ["arr matey the sea", "here is a plain answer"]}, scorer=scorer)
    monitor.resume(0, "run")
    monitor.measure_base(None)
    calls["step"] = 1
    check = monitor.check(None, 1)
    scores = scorer.score(["arr matey the sea", "here is a plain answer"])
    assert check.persona == pytest.approx(sum(scores) / 2, abs=1e-4)
    assert check.persona_se == pytest.approx(abs(scores[0] - scores[1]) / 2, abs=1e-4)  # sd/sqrt(2) for two
    assert json.loads((tmp_path / "monitor.json").read_text())["checks"][0]["persona_se"] == check.persona_se


def test_resume_keeps_the_history_up_to_the_checkpoint_of_the_same_run_only(tmp_path):
    monitor, calls = _monitor(tmp_path, {1: ["a b c"], 2: ["d e f"], 3: ["g h i"]})
    monitor.resume(0, "run")
    monitor.measure_base(None)
    for step in (1, 2, 3):
        calls["step"] = step
        monitor.check(None, step)
    again, _ = _monitor(tmp_path, {})
    again.resume(2, "run")
    assert [c.step for c in again.checks] == [1, 2] and again.base_looping == 0.0
    other, _ = _monitor(tmp_path, {})
    other.resume(2, "another run")
    assert other.checks == [] and other.base_looping is None


@pytest.mark.parametrize("keep", ["best", "last"])
def test_trainer_logs_checks_stops_early_and_publishes_the_best_adapter(tmp_path, tiny_lm, keep):
    from safetensors.torch import load_file

    from character_baker.stages.training.dpo import train_dpo
    from tests.test_training_dpo import toy_config, toy_records

    model, tokenizer = tiny_lm
    run = RunDir.create(tmp_path / "run")
    stage_dir = run.path("adapters", "distill")
    # Steps 1 and 2 answer cleanly, every later check loops: best = 2, and two bad checks in a row stop it.
    clean, looping = ["a fine answer"] * 2, [LOOP] * 2
    progress = {"step": 0}

    def answer(model, prompts, adapter_on):
        if not adapter_on:
            return clean
        progress["step"] += 1
        return clean if progress["step"] <= 2 else looping

    monitor = TrainingMonitor(MonitorConfig(every=1, patience=2, looping_tolerance=0.0, keep=keep), ["p1", "p2"],
                              answer, None, stage_dir)
    result = train_dpo(run, toy_records(16), model, tokenizer, toy_config(batch_size=2, micro_batch_size=2,
                                                                          save_steps=100), monitor=monitor)
    assert result["stopped_early_at"] == 4 and result["monitor_best_step"] == 2
    log = read_jsonl(run.path("logs", "distill.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["monitor_looping"] for r in log] == [0.0, 0.0, 1.0, 1.0]
    published = load_file(stage_dir / "adapter_model.safetensors")
    best = load_file(stage_dir / BEST_FOLDER / "adapter_model.safetensors")
    same = all(published[k].equal(best[k]) for k in best)
    assert same == (keep == "best") and result["adapter_step"] == (2 if keep == "best" else 4)


def test_monitor_settings_do_not_invalidate_checkpoints(tmp_path):
    from character_baker.stages.training.trainer import LoraTrainer

    fingerprints = set()
    for every in (0, 5):
        trainer = LoraTrainer(DistillConfig(monitor={"every": every}), objective=type("O", (), {"name": "dpo"})(),
                              run_dir=RunDir.create(tmp_path / "run"), stage="distill")
        trainer.examples, trainer.extra_losses = [], []
        fingerprints.add(trainer.fingerprint)
    assert len(fingerprints) == 1
