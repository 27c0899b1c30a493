"""Kill `train --preset smoke` with SIGKILL at ten seeded moments spread over the whole chain.

After each kill the same command runs again. At every point the manifest must parse as JSON;
in the end the run completes, no JSONL store holds a duplicate id (or a duplicate training
step), no record the uninterrupted run wrote is missing, and the adapters and merged weights
equal an uninterrupted run's within float tolerance.

The moments: for each kill a stage is drawn (seeded) and the process is killed a seeded delay
after the manifest shows that stage running; stages already done are not drawn again, so the
kills walk the chain from prompts to eval.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from character_baker.core.runs import read_jsonl

PIRATE = Path(__file__).resolve().parent.parent / "constitutions" / "pirate.yaml"
CHAIN = ["prompts", "distill_data", "distill", "introspect_data", "introspect", "merge", "calibrate", "eval"]
KILLS = 10
STORES = ["data/prompts.jsonl", "data/distill.candidates.jsonl", "data/distill.jsonl", "data/distill.filtered.jsonl",
          "data/introspection.jsonl", "data/introspection.filtered.jsonl"]
LOGS = ["logs/distill.jsonl", "logs/introspect.jsonl"]
WEIGHTS = ["adapters/distill/adapter_model.safetensors", "adapters/introspect/adapter_model.safetensors",
           "adapters/persona/adapter_model.safetensors", "model/model.safetensors"]
pytestmark = pytest.mark.slow


def _command(model: Path, runs_root: Path) -> list[str]:
    return [sys.executable, "-m", "character_baker", "train", str(PIRATE), "--preset", "smoke", "--model", str(model),
            "--runs-root", str(runs_root)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _manifest(run: Path) -> dict:
    """The manifest if it exists; it must always be complete JSON (atomic writes)."""
    path = run / "manifest.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())  # a torn manifest raises here and fails the test


def _stage_status(manifest: dict, stage: str) -> str | None:
    return manifest.get("stages", {}).get(stage, {}).get("status")


def _kill_during(command: list[str], run: Path, stage: str, delay: float, log: Path) -> str:
    """Start the command; SIGKILL it `delay` seconds after `stage` shows as running. Returns what happened."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        seen_running = None
        while process.poll() is None:
            status = _stage_status(_manifest(run), stage)
            if status == "running" and seen_running is None:
                seen_running = time.monotonic()
            if status == "done" and seen_running is None:
                break  # the stage finished between two polls: kill in whatever runs now
            if seen_running is not None and time.monotonic() - seen_running >= delay:
                break
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return "killed"
        return f"exited {process.returncode}"


def _ids(path: Path) -> list[str]:
    return [record["id"] for record in read_jsonl(path)]


def _assert_stores_consistent(run: Path, reference: Path | None = None) -> None:
    for name in STORES:
        ids = _ids(run / name)
        assert len(ids) == len(set(ids)), f"{name} holds a duplicate record"
        if reference is not None:
            assert set(ids) == set(_ids(reference / name)), f"{name} lost or gained records"
    for name in LOGS:
        steps = [record["step"] for record in read_jsonl(run / name)]
        assert steps == sorted(set(steps)), f"{name} repeats or reorders training steps: {steps}"


def test_kill_at_ten_moments_then_finish_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    reference_root, killed_root = tmp_path / "reference", tmp_path / "killed"
    log = tmp_path / "train.log"
    done = subprocess.run(_command(tiny_model_dir, reference_root), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference, run = reference_root / "pirate", killed_root / "pirate"

    rng = random.Random(13)
    outcomes = []
    for _ in range(KILLS):
        remaining = [stage for stage in CHAIN if _stage_status(_manifest(run), stage) != "done"] or CHAIN[-1:]
        stage = rng.choice(remaining[:3])  # one of the next stages, so the kills walk the whole chain
        delay = rng.uniform(0.0, 2.5)
        outcomes.append((stage, round(delay, 2), _kill_during(_command(tiny_model_dir, killed_root), run, stage,
                                                               delay, log)))
        _assert_stores_consistent(run)
    killed_in = {stage for stage, _, outcome in outcomes if outcome == "killed"}
    assert len(killed_in) >= 4, f"the kills did not spread over the chain: {outcomes}"

    final = subprocess.run(_command(tiny_model_dir, killed_root), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:] + log.read_text()[-3000:]
    manifest = _manifest(run)
    assert all(_stage_status(manifest, stage) == "done" for stage in CHAIN), manifest.get("stages")
    _assert_stores_consistent(run, reference)
    for name in WEIGHTS:
        ours, theirs = load_file(run / name), load_file(reference / name)
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.allclose(ours[key], theirs[key], atol=1e-5, rtol=1e-4), (name, key, outcomes)
