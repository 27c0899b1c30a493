"""Data order is independent of the process count, and two CPU processes train exactly like one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from character_baker.core.runs import RunDir, read_jsonl
from character_baker.stages.training.batching import epoch_batches, micro_batches
from character_baker.stages.training.dpo import train_dpo
from character_baker.stages.training.launch import launch_command, relaunch
from character_baker.testing import tiny_model
from tests.test_training_dpo import toy_config, toy_records

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import sys
import torch
from character_baker.core.runs import RunDir
from character_baker.stages.training.dpo import train_dpo
from character_baker.testing import tiny_model, tiny_tokenizer
from tests.test_training_dpo import toy_config, toy_records

torch.set_num_threads(1)
tokenizer = tiny_tokenizer()
train_dpo(RunDir.create(sys.argv[1]), toy_records(8), tiny_model("llama", tokenizer), tokenizer,
          toy_config(micro_batch_size=1, epochs=1.0))
"""


def test_every_process_count_sees_the_same_global_batches():
    lengths = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 3, 7, 2]
    batches = epoch_batches(lengths, batch_size=4, seed=3, epoch=0)
    assert batches == epoch_batches(lengths, batch_size=4, seed=3, epoch=0)
    assert batches != epoch_batches(lengths, batch_size=4, seed=3, epoch=1)
    assert len(batches) == len(lengths) // 4 and all(len(b) == 4 for b in batches)
    assert len({i for b in batches for i in b}) == 12  # no index twice; one incomplete batch skipped
    for batch in batches:
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
        for world in (1, 2, 4):
            shards = [micro_batches(batch, 1, rank, world) for rank in range(world)]
            assert sorted(i for shard in shards for micro in shard for i in micro) == sorted(batch)
            assert {len(shard) for shard in shards} == {4 // world}


def test_launch_commands_and_no_recursion(monkeypatch):
    torchrun = launch_command(["train", "x.yaml"], launcher="torchrun", nproc=2)
    guard = ["-m", "character_baker.stages.training.launch"]  # the launcher ends with the command that started it
    assert torchrun[1:] == [*guard, "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "character_baker", "train", "x.yaml"]
    accelerate = launch_command(["train"], launcher="accelerate", nproc=4)
    assert accelerate[1:6] == [*guard, "accelerate.commands.launch", "--num_processes", "4"]
    assert "--multi_gpu" in accelerate and accelerate[-3:] == ["-m", "character_baker", "train"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert relaunch(["train"], launcher="torchrun", nproc=2) is None  # already launched: do the work here
    monkeypatch.delenv("WORLD_SIZE")
    assert relaunch(["train"], launcher=None, nproc=1) is None


def test_two_cpu_processes_match_one_process_on_the_same_global_batch(tmp_path, tiny_tok):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]),
           "CUDA_VISIBLE_DEVICES": ""}
    command = launch_command([str(tmp_path / "two")], launcher="torchrun", nproc=2, program=[str(script)])
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one = RunDir.create(tmp_path / "one")
    train_dpo(one, toy_records(8), tiny_model("llama", tiny_tok), tiny_tok, toy_config(micro_batch_size=4))

    two_log, one_log = read_jsonl(tmp_path / "two" / "logs" / "distill.jsonl"), read_jsonl(one.path("logs", "distill.jsonl"))
    assert "2 process(es)" in done.stdout and [r["step"] for r in two_log] == [r["step"] for r in one_log] == [1, 2]
    for a, b in zip(two_log, one_log):
        for key in ("loss", "dpo_loss", "nll_loss", "kl", "reward_margin", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
        assert a["tokens"] == b["tokens"]
    two_adapter = load_file(tmp_path / "two" / "adapters" / "distill" / "adapter_model.safetensors")
    one_adapter = load_file(one.path("adapters", "distill", "adapter_model.safetensors"))
    for key in one_adapter:
        torch.testing.assert_close(two_adapter[key], one_adapter[key], rtol=1e-4, atol=1e-5)


def test_fsdp_trains_without_autocast_and_keeps_it_otherwise(monkeypatch):
    """Under FSDP the float32 LoRA shards must get float32 gradients: no bf16 autocast policy."""
    from torch import nn

    from character_baker.stages.training.trainer import _mixed_precision

    bf16 = nn.Linear(2, 2).to(torch.bfloat16)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert _mixed_precision(bf16) == "bf16" and _mixed_precision(nn.Linear(2, 2)) == "no"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert _mixed_precision(bf16) == "no"


def test_a_checkpoint_killed_while_being_deleted_is_not_resumed(tmp_path, monkeypatch):
    """Old checkpoints lose their marker before their files: a kill mid-delete leaves nothing that looks complete."""
    import shutil

    from character_baker.stages.training import checkpoints

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / checkpoints.STATE_FILE).write_bytes(b"state")
    (folder / checkpoints.MARKER).write_text('{"fingerprint": "f", "step": 4}')
    assert checkpoints.complete_checkpoints(tmp_path, "f") == [(4, folder)]

    def killed(path, ignore_errors=False):
        (Path(path) / checkpoints.STATE_FILE).unlink()  # one file gone, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.remove_checkpoint(folder)
    assert folder.is_dir() and checkpoints.complete_checkpoints(tmp_path, "f") == []


@pytest.mark.slow
def test_the_training_benchmark_runs_in_two_processes_at_the_same_global_batch(tmp_path):
    """`benchmarks/train.py --nproc 2` re-runs itself under torchrun; rank 0 alone appends one two-process section."""
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    done = subprocess.run([sys.executable, "benchmarks/train.py", "--config", "tiny", "--device", "cpu", "--threads", "1",
                           "--seq-len", "64", "--pairs-per-step", "4", "--steps", "2", "--warmup-steps", "1",
                           "--no-trl", "--nproc", "2", "--results", str(results)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    section = results.read_text()
    assert section.count("## LoRA DPO training") == 1 and "2 processes (DDP, same global batch)" in section
    assert "x 2 process(es) (DDP)" in done.stdout and "--nproc 2" in section
