"""Tokens/s of the distill stage in one process and in N (one GPU each), at the same global batch.

    PYTHONPATH=src python benchmarks/distill_scaling.py --model PATH --nproc 2 \\
        --set "distill.filters=[empty, duplicate, assistant_phrase]"

The pairs are built once (`distill --data-only`, `--preset`), copied into one run folder per
process count, and trained by the real command: `distill --skip-data` in one process, then with
`--launcher L --nproc N` (DDP; FSDP2 when accelerate's FSDP variables are set and `--launcher
accelerate`). Both runs get the same `distill.batch_size` (the global batch) and
`distill.micro_batch_size` (per process), so one process accumulates N micro-batches where N
processes take one each. The monitor is off (it answers in one process only).

Numbers, from each run's logs/distill.jsonl: tokens/s of a step = the tokens of the whole global
batch (all processes) / rank 0's step time, the median over the steps after `--warmup-steps`;
step seconds likewise; peak memory = rank 0's largest. The distribution column is what the
trainer's setup line says it used. Prints a table and appends it to `--results`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import machine_description, versions  # noqa: E402  (the training benchmark's helpers)

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model reference (folder, .gguf, catalogue name)")
    parser.add_argument("--constitution", default=str(REPO / "constitutions" / "pirate.yaml"))
    parser.add_argument("--preset", default="smoke", help="recipe preset of the data and the training")
    parser.add_argument("--batch-size", type=int, default=32, help="distill.batch_size: the global batch (pairs)")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="distill.micro_batch_size, per process")
    parser.add_argument("--epochs", type=float, default=8, help="distill.epochs (enough steps to time)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the second run")
    parser.add_argument("--launcher", default="torchrun", choices=("torchrun", "accelerate"))
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more recipe overrides, both runs")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run folders (default: a temporary one)")
    parser.add_argument("--note", default="", help="a remark added to the results section")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")), help="markdown file to append to")
    return parser.parse_args(argv)


def distill(args: argparse.Namespace, run_dir: Path, *extra: str) -> str:
    """Run `character-baker distill` on `run_dir` with the shared settings; return its output."""
    settings = [f"distill.batch_size={args.batch_size}", f"distill.micro_batch_size={args.micro_batch_size}",
                f"distill.epochs={args.epochs}", "distill.monitor.every=0", *args.sets]
    command = [sys.executable, "-m", "character_baker", "distill", args.constitution, "--preset", args.preset,
               "--model", args.model, "--run-dir", str(run_dir), *[a for s in settings for a in ("--set", s)], *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def measure(args: argparse.Namespace, run_dir: Path, output: str) -> dict:
    """The medians of one training run's per-step records, and the distribution it reported."""
    steps = [json.loads(line) for line in (run_dir / "logs" / "distill.jsonl").read_text().splitlines()]
    timed = steps[args.warmup_steps:]
    if not timed:
        raise SystemExit(f"{run_dir}: {len(steps)} steps, none after {args.warmup_steps} warm-up: raise --epochs")
    found = re.search(r"x (\d+) process\(es\) \(([^)]+)\)", output)
    return {"processes": int(found.group(1)) if found else 0, "distribution": found.group(2) if found else "?",
            "steps": len(timed), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "step_seconds": statistics.median(r["step_seconds"] for r in timed),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in timed)}


def markdown(args: argparse.Namespace, rows: list[dict], pairs: int) -> str:
    """The results as a markdown section."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## distill stage scaling: {Path(args.model).name}, 1 vs {args.nproc} processes, global batch "
             f"{args.batch_size} pairs, micro-batch {args.micro_batch_size} per process\n",
             f"- machine: {machine_description(device)} per process; date: {when}; versions: {versions()}",
             f"- command: `{shlex.join(['benchmarks/distill_scaling.py', *sys.argv[1:]])}`",
             f"- {pairs} pairs (`--preset {args.preset}`), {args.epochs:g} epochs; medians over the steps after "
             f"{args.warmup_steps} warm-up; tokens/s = the global batch's tokens / rank 0's step time; memory: rank 0"
             + (f"\n- note: {args.note}" if args.note else "") + "\n",
             "| processes | distribution | timed steps | tokens/s | step (s) | peak memory (GiB) | vs 1 process |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['processes']} | {row['distribution']} | {row['steps']} | {row['tokens_per_s']:,.0f} | "
                     f"{row['step_seconds']:.3f} | {row['peak_memory_gb']:.2f} | "
                     f"x{row['tokens_per_s'] / rows[0]['tokens_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Build the pairs, train in 1 and N processes, print and append the table."""
    args = parse_args(argv)
    if args.batch_size % (args.micro_batch_size * args.nproc):
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size x --nproc")
    with tempfile.TemporaryDirectory(prefix="distill-scaling-") as scratch:
        work = args.work or Path(scratch)
        distill(args, work / "pairs", "--data-only")
        pairs = len((work / "pairs" / "data" / "distill.jsonl").read_text().splitlines())
        rows = []
        for processes in (1, args.nproc):
            run_dir = work / f"{processes}-process"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(work / "pairs", run_dir)
            launch = ["--launcher", args.launcher, "--nproc", str(processes)] if processes > 1 else []
            rows.append(measure(args, run_dir, distill(args, run_dir, "--skip-data", *launch)))
    section = markdown(args, rows, pairs)
    print(section)
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
