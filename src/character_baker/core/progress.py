"""One progress display for a whole command: the chain's own line and the current task's bar share it.

    with chain_display(["prompts", "distill_data", ...], estimates) as display:
        display.stage_started("distill_data")
        ...   # generation and training reporters put their bars in `display` (see `current_display`)
        display.stage_finished("distill_data", seconds=41.0)

In a terminal it is one rich display: a line "stage 3/8 distill_data" with the run's ETA (the
plan's per-stage estimates, rescaled by how long the finished stages took against theirs) and,
below it, the bar of whatever the stage is doing (responses and tokens/s while generating, steps
and loss while training). Anywhere else (logs, CI, pipes) it prints one plain line when a stage
starts and one when it ends, on stderr, and the reporters print their own plain lines.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import IO, Any, Iterator

_CURRENT: "ChainDisplay | None" = None
PRIOR_SECONDS = 60.0  # estimate-seconds of evidence the ETA's rescaling starts from (at factor 1)


def format_duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ChainDisplay:
    """The stage chain's progress: which stage of how many, the run's ETA, and a place for task bars."""

    def __init__(self, stages: list[str], estimates: dict[str, float], *, stream: IO[str] | None = None,
                 terminal: bool | None = None):
        self.stages, self.estimates = list(stages), dict(estimates)
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.done: dict[str, float] = {}
        self.current: str | None = None
        self.started = time.monotonic()
        self.progress: Any = None
        if self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), console=Console(file=self.stream))
            self.run_task = self.progress.add_task("run", total=len(self.stages), status="")
            self.progress.start()

    # ------------------------------------------------------------------ the run's line
    def eta_seconds(self) -> float:
        """Seconds left: the estimates of the stages not done, rescaled by the finished stages' actual/estimate.

        The rescaling starts from a prior of PRIOR_SECONDS at factor 1, so one instant stage (a cached
        prompt set) does not make the rest of the run look five times shorter."""
        finished_estimate = sum(self.estimates.get(s, 0.0) for s in self.done)
        factor = (sum(self.done.values()) + PRIOR_SECONDS) / (finished_estimate + PRIOR_SECONDS)
        factor = min(max(factor, 0.2), 5.0)
        remaining = [s for s in self.stages if s not in self.done]
        return factor * sum(self.estimates.get(s, 0.0) for s in remaining)

    def headline(self) -> str:
        """'stage 3/8 distill_data' (or 'done')."""
        if self.current is None:
            return "done" if len(self.done) == len(self.stages) else "starting"
        return f"stage {self.stages.index(self.current) + 1}/{len(self.stages)} {self.current}"

    def stage_started(self, name: str) -> None:
        """Mark `name` as the running stage."""
        self.current = name
        status = f"elapsed {format_duration(time.monotonic() - self.started)}, run ETA {format_duration(self.eta_seconds())}"
        if self.progress is not None:
            self.progress.update(self.run_task, description=self.headline(), status=status)
        else:
            print(f"[{self.headline()}] started; {status}", file=self.stream, flush=True)

    def stage_finished(self, name: str, seconds: float, status: str = "ran") -> None:
        """Mark `name` done after `seconds` (status 'ran' or 'skipped')."""
        self.done[name] = seconds if status == "ran" else self.estimates.get(name, 0.0)
        eta = f"run ETA {format_duration(self.eta_seconds())}"
        if self.progress is not None:
            self.progress.update(self.run_task, completed=len(self.done), status=eta)
        else:
            print(f"[{self.headline()}] {status} in {seconds:.1f}s; {eta}", file=self.stream, flush=True)

    # ------------------------------------------------------------------ task bars
    def add_task(self, label: str, total: int, **fields: Any) -> Any:
        """A bar under the run's line (terminal only); returns its handle."""
        return self.progress.add_task(label, total=total, status="", **fields)

    def update(self, task: Any, **values: Any) -> None:
        """Move a task bar."""
        self.progress.update(task, **values)

    def remove(self, task: Any) -> None:
        """Take a finished task's bar away (the run's line stays)."""
        self.progress.remove_task(task)

    def close(self) -> None:
        """Stop the display."""
        if self.progress is not None:
            self.progress.update(self.run_task, description=self.headline(),
                                 status=f"total {format_duration(time.monotonic() - self.started)}")
            self.progress.stop()


def current_display() -> ChainDisplay | None:
    """The display a chain opened in a terminal, for reporters to put their bars in (None elsewhere)."""
    return _CURRENT if _CURRENT is not None and _CURRENT.progress is not None else None


@contextlib.contextmanager
def chain_display(stages: list[str], estimates: dict[str, float], **options: Any) -> Iterator[ChainDisplay]:
    """Open the chain's display for the duration of the block (the one reporters find)."""
    global _CURRENT
    display = ChainDisplay(stages, estimates, **options)
    previous, _CURRENT = _CURRENT, display
    try:
        yield display
    finally:
        _CURRENT = previous
        display.close()
