"""SIGKILL a two-process training run (launcher and both workers) after a checkpoint; the rerun resumes.

The tiny model's pairs are built once (`--data-only`); each test trains them uninterrupted in two
gloo processes, then trains a copy that is killed as soon as one complete checkpoint exists and
runs the same command again. The rerun must resume from the newest complete checkpoint (a
marker-less folder planted after it is ignored), finish, log every step exactly once and end
with the uninterrupted run's adapter (the two-process parity test's tolerance).

LoRA dropout is on, so each rank's random state must come back as that rank saved it (the two
ranks draw different amounts: their micro-batches have different shapes).

On a machine with two GPUs the processes take one each (NCCL; accelerate then applies FSDP2
itself), and CHARACTER_BAKER_RESUME_MODEL picks another model than the tiny one (a folder or a
.gguf; docs/multi-gpu.md runs SmolLM2-135M-Instruct). CHARACTER_BAKER_RESUME_REPORT names a JSONL
file that gets one line per kill-and-resume (steps, resume point, largest weight difference).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from character_baker.core.runs import read_jsonl
from character_baker.stages.training.checkpoints import MARKER
from character_baker.stages.training.launch import launch_command
from tests.test_distill_data import cli_args

REPO = Path(__file__).resolve().parents[1]
ON_GPUS = torch.cuda.device_count() >= 2  # one GPU per process; else two CPU processes (gloo)
MODEL = os.environ.get("CHARACTER_BAKER_RESUME_MODEL")
REPORT = os.environ.get("CHARACTER_BAKER_RESUME_REPORT")
SAVE_STEPS = 3
TRAIN_SETTINGS = ["--set", f"distill.save_steps={SAVE_STEPS}",
                  "--set", "distill.lora.dropout=0.1", "--set", "distill.save_total_limit=2"]
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
# accelerate 1.15 applies FSDP only on accelerator devices: on CPU processes it silently wraps the
# model in DDP. This worker flips its state to FSDP before the CLI runs, so the same
# `fsdp2_prepare_model` (torch's `fully_shard`, which runs on gloo) shards the model on the CPU.
# On GPUs accelerate applies FSDP itself and the flip changes nothing.
FSDP_ON_CPU_WORKER = """
import sys
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

original_init = AcceleratorState.__init__

def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

AcceleratorState.__init__ = init_with_fsdp_on_cpu
from character_baker.cli import main
sys.exit(main(sys.argv[1:]))
"""
pytestmark = pytest.mark.slow


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    devices = {} if ON_GPUS else {"CUDA_VISIBLE_DEVICES": ""}
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **devices,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]), **(extra or {})}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    """The model the runs train: CHARACTER_BAKER_RESUME_MODEL, else the tiny test model."""
    return Path(MODEL) if MODEL else tiny_model_dir


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, model_dir) -> Path:
    """A run folder holding the model's distillation pairs (`distill --data-only`), built once for the module."""
    run_dir = tmp_path_factory.mktemp("pairs") / "run"
    cache = {"CHARACTER_BAKER_CACHE": str(tmp_path_factory.getbasetemp() / "cb-cache")}  # as conftest isolates it
    done = subprocess.run([sys.executable, "-m", "character_baker", *cli_args(model_dir, run_dir)], env=_env(cache),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return run_dir


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process now alive (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all of its descendants (torchrun starts each worker in a session of its own)."""
    children, tree = _children(), [pid]
    for parent in tree:
        tree.extend(children.get(parent, []))
    return tree


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until_gone(pids: list[int], seconds: float = 60) -> None:
    """Wait until none of `pids` runs; fail naming the ones left."""
    deadline = time.time() + seconds
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "processes left running"


def kill_tree(process: subprocess.Popen) -> list[int]:
    """SIGKILL the process and every descendant at once; wait until none is left; return their pids."""
    pids = process_tree(process.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    wait_until_gone(pids)
    return pids


def complete_steps(stage_dir: Path) -> list[int]:
    """Steps of the checkpoint folders that carry their completion marker."""
    steps = []
    for folder in stage_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and (folder / MARKER).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def train_command(model_dir: Path, run_dir: Path) -> list[str]:
    """`distill --skip-data` on the tiny model with frequent checkpoints (no launcher options)."""
    args = [a for a in cli_args(model_dir, run_dir) if a != "--data-only"]
    args = ["--run-dir" if a == "--run" else a for a in args]  # torchrun's parser rejects --run
    return [*args, "--skip-data", *TRAIN_SETTINGS]


def start_until_checkpoint(command: list[str], env: dict, stage_dir: Path, log: Path) -> subprocess.Popen:
    """Start `command` (output to `log`) and return once a checkpoint is complete; fail if it ends first."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not complete_steps(stage_dir):
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
    return process


def run_to_kill(command: list[str], env: dict, stage_dir: Path, log: Path) -> list[int]:
    """Start `command`, SIGKILL its whole process tree once a checkpoint is complete; return the steps on disk."""
    pids = kill_tree(start_until_checkpoint(command, env, stage_dir, log))
    assert len(pids) >= 3, f"expected the launcher and two workers, found {pids}"
    return complete_steps(stage_dir)


def summary(run_dir: Path) -> dict:
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["distill"]
    assert entry["status"] == "done"
    return entry["summary"]


def largest_difference(a: Path, b: Path) -> float:
    """Largest absolute weight difference between two adapter files (same keys asserted)."""
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    return max(float((first[key] - second[key]).abs().max()) for key in first)


def report(**numbers) -> None:
    """One JSON line of this run's numbers into CHARACTER_BAKER_RESUME_REPORT, when it is set."""
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"device": "cuda" if ON_GPUS else "cpu", **numbers}) + "\n")


def kill_and_resume(pairs: Path, tmp_path: Path, model_dir: Path, command_for, env: dict, distribution: str) -> None:
    """The shared scenario: uninterrupted run, killed run, rerun; compare."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(pairs, straight)
    shutil.copytree(pairs, resumed)

    done = subprocess.run(command_for(straight), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"x 2 process(es) ({distribution})" in done.stdout, done.stdout[-3000:]
    total = summary(straight)["steps"]
    assert summary(straight)["resumed_from_step"] == 0 and total > 2 * SAVE_STEPS

    stage_dir = resumed / "adapters" / "distill"
    on_disk = run_to_kill(command_for(resumed), env, stage_dir, tmp_path / "killed.log")
    assert on_disk and on_disk[-1] < total, on_disk
    assert not (stage_dir / "adapter_model.safetensors").exists()
    (stage_dir / f"checkpoint-{on_disk[-1] + SAVE_STEPS}").mkdir(exist_ok=True)  # killed before its marker

    rerun = subprocess.run(command_for(resumed), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert summary(resumed)["resumed_from_step"] == on_disk[-1] > 0
    assert summary(resumed)["steps"] == total
    assert f"({on_disk[-1]} done)" in rerun.stdout

    steps = [record["step"] for record in read_jsonl(resumed / "logs" / "distill.jsonl")]
    assert steps == list(range(1, total + 1)), steps
    straight_log = read_jsonl(straight / "logs" / "distill.jsonl")
    for a, b in zip(straight_log, read_jsonl(resumed / "logs" / "distill.jsonl")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["learning_rate"] == b["learning_rate"]
    difference = largest_difference(straight / "adapters" / "distill" / "adapter_model.safetensors",
                                    stage_dir / "adapter_model.safetensors")
    report(distribution=distribution, model=str(model_dir), steps=total, checkpoints_at_kill=on_disk,
           resumed_from_step=summary(resumed)["resumed_from_step"], largest_difference=difference)
    expected = load_file(straight / "adapters" / "distill" / "adapter_model.safetensors")
    actual = load_file(stage_dir / "adapter_model.safetensors")
    for key in expected:  # the two-process parity test's tolerance
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{m} (largest difference {difference:.3g})")


def torchrun_command(model_dir: Path, run_dir: Path) -> list[str]:
    """`character-baker distill ... --launcher torchrun --nproc 2` as a user types it."""
    return [sys.executable, "-m", "character_baker", *train_command(model_dir, run_dir), "--launcher", "torchrun",
            "--nproc", "2"]


def test_ddp_killed_with_its_launcher_resumes_from_the_last_complete_checkpoint(pairs, tmp_path, model_dir):
    """`distill --launcher torchrun --nproc 2`: CLI, torchrun and both workers SIGKILLed, then the same command."""
    kill_and_resume(pairs, tmp_path, model_dir, lambda run_dir: torchrun_command(model_dir, run_dir), _env(), "DDP")


def test_killing_the_command_alone_ends_the_launcher_and_its_workers(pairs, tmp_path, model_dir):
    """SIGKILL of the CLI process only: torchrun (which starts each worker in its own session) and the workers end too.

    Otherwise they would train on, orphaned, into the run directory that a rerun trains in as well."""
    run_dir = tmp_path / "run"
    shutil.copytree(pairs, run_dir)
    command = [*torchrun_command(model_dir, run_dir), "--set", "distill.epochs=8"]
    process = start_until_checkpoint(command, _env(), run_dir / "adapters" / "distill", tmp_path / "run.log")
    tree = process_tree(process.pid)
    assert len(tree) >= 4, f"expected the command, the launcher and two workers, found {tree}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    wait_until_gone(tree)
    assert not (run_dir / "adapters" / "distill" / "adapter_model.safetensors").exists()


def test_fsdp2_killed_resumes_from_the_last_complete_checkpoint(pairs, tmp_path, model_dir):
    """FSDP2 (accelerate, fully_shard on gloo) in two CPU processes: accelerate launch and both workers SIGKILLed."""
    worker = tmp_path / "fsdp_on_cpu.py"
    worker.write_text(textwrap.dedent(FSDP_ON_CPU_WORKER))

    def command_for(run_dir: Path) -> list[str]:
        return launch_command(train_command(model_dir, run_dir), launcher="accelerate", nproc=2,
                              program=[str(worker)])

    kill_and_resume(pairs, tmp_path, model_dir, command_for, _env(FSDP2_ENV), "FSDP2")
