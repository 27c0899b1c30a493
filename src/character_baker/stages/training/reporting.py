"""Per-step training records: JSON lines, a progress display, and optional trackers.

Every optimiser step appends one JSON object to `logs/<stage>.jsonl` (step, epoch, every loss
term and metric, learning rate, grad norm, tokens/s, peak memory, elapsed, ETA). In a terminal a
rich progress bar shows the headline numbers; elsewhere (CI, files) one plain line per step.
`report_to` also sends the records to TensorBoard and/or Weights & Biases when installed.
"""

from __future__ import annotations

import importlib.util
import json
import resource
from pathlib import Path
from typing import Any, Sequence

import torch

from character_baker.core.errors import Problem
from character_baker.core.progress import current_display
from character_baker.core.runs import read_jsonl, write_jsonl_atomic

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
HEADLINE = ("loss", "reward_accuracy", "reward_margin", "learning_rate", "tokens_per_s")


def report_to_problems(report_to: Sequence[str], field: str) -> list[Problem]:
    """One problem per unknown or uninstalled tracker in `report_to`."""
    problems = []
    for name in report_to:
        if name not in TRACKERS:
            problems.append(Problem("recipe", field, f"unknown tracker {name!r}", f"use one of {sorted(TRACKERS)}"))
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            problems.append(Problem("recipe", field, f"{name} is not installed",
                                    f"pip install {TRACKERS[name]}, or remove {name!r} from {field}"))
    return problems


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on a CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


MONITOR_KEYS = ("monitor_persona", "monitor_looping")


def _format(record: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}"]
    parts += [f"{key} {record[key]:.4g}" for key in HEADLINE + MONITOR_KEYS if isinstance(record.get(key), (int, float))]
    return "  ".join(parts)


class StepReporter:
    """Writes each step's record to the JSONL log, the display and the trackers (main process only)."""

    def __init__(self, log_path: Path, *, total_steps: int, start_step: int, console: Any = None,
                 report_to: Sequence[str] = (), run_name: str = "", config: dict | None = None, enabled: bool = True):
        from rich.console import Console

        self.log_path, self.total_steps, self.enabled = log_path, total_steps, enabled
        self.console = console if console is not None else Console()
        self.trackers: list[Any] = []
        self.progress = self.display = None
        if not enabled:
            return
        write_jsonl_atomic(log_path, [r for r in read_jsonl(log_path) if r.get("step", 0) <= start_step])
        self.display = current_display()
        if self.display is not None:  # a chain's display is open: the steps get a bar in it
            self.progress = self.display.progress
            self.task = self.display.add_task(log_path.stem, total_steps, completed=start_step)
        elif self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.console)
            self.task = self.progress.add_task(log_path.stem, total=total_steps, completed=start_step, status="")
            self.progress.start()
        self.trackers = [self._open_tracker(name, run_name, config or {}) for name in report_to]

    def _open_tracker(self, name: str, run_name: str, config: dict) -> Any:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(self.log_path.with_name(f"{self.log_path.stem}-tensorboard")))
        import wandb

        return wandb.init(project="character-baker", name=run_name, dir=str(self.log_path.parent), config=config)

    def log(self, record: dict[str, Any]) -> None:
        """Append one step's record everywhere."""
        if not self.enabled:
            return
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if hasattr(tracker, "add_scalar"):
                for key, value in numbers.items():
                    tracker.add_scalar(key, value, record["step"])
            else:
                tracker.log(numbers, step=record["step"])
        if self.progress is not None:
            status = "  ".join(f"{k} {record[k]:.4g}" for k in HEADLINE[:3] if k in record)
            self.progress.update(self.task, completed=record["step"], status=status)
        else:
            self.console.print(_format(record, self.total_steps), markup=False, highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        """A one-off line (setup, reference pass, saving)."""
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        """Stop the display and flush the trackers."""
        if self.display is not None:
            self.display.remove(self.task)
        elif self.progress is not None:
            self.progress.stop()
        for tracker in self.trackers:
            (tracker.close if hasattr(tracker, "close") else tracker.finish)()
        self.trackers = []
