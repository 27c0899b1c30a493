"""Generation progress: responses done / total, generated tokens per second, ETA.

On a terminal it is a rich progress bar; otherwise (logs, CI, pipes) it prints one plain line
every 10% of the work or every 30 seconds, whichever comes first, and a last line at the end.
Output goes to stderr so it never mixes with a command's results on stdout.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import IO, Iterator, Literal

from character_baker.core.progress import current_display, format_duration

Mode = Literal["rich", "plain", "silent"]




class ProgressReporter:
    """Counts finished responses and generated tokens and shows them; thread-safe."""

    def __init__(self, label: str, total: int, *, mode: Mode | None = None, stream: IO[str] | None = None,
                 every_fraction: float = 0.1, every_seconds: float = 30.0):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.mode: Mode = mode or ("rich" if self.stream.isatty() else "plain")
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.done = self.tokens = 0
        self._lock = threading.Lock()
        self._start = self._last_line = time.monotonic()
        self._next_fraction = every_fraction
        self._bar = self._task = None
        self._closed = False
        self._display = current_display() if self.mode == "rich" else None
        if self._display is not None:  # a chain's display is open: one bar in it, under the run's line
            self._task = self._display.add_task(label, total)
        elif self.mode == "rich":
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]:,.0f} tok/s"), TimeRemainingColumn(),
                             console=Console(file=self.stream), transient=False)
        self._task = self._bar.add_task(self.label, total=self.total, rate=0.0)
        self._bar.start()

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second since the reporter started."""
        return self.tokens / max(time.monotonic() - self._start, 1e-9)

    def advance(self, responses: int, tokens: int = 0) -> None:
        """Record `responses` more finished responses holding `tokens` generated tokens."""
        with self._lock:
            self.done += responses
            self.tokens += tokens
            if self._display is not None:
                self._display.update(self._task, completed=self.done, status=self.status())
            elif self.mode == "rich":
                self._bar.update(self._task, completed=self.done, rate=self.tokens_per_second)
            elif self.mode == "plain" and self._line_due():
                self._print_line()

    def _line_due(self) -> bool:
        fraction = self.done / self.total if self.total else 1.0
        if fraction >= self._next_fraction or time.monotonic() - self._last_line >= self.every_seconds:
            while self._next_fraction <= fraction:
                self._next_fraction += self.every_fraction
            return True
        return False

    def status(self) -> str:
        """'N tok/s, ETA H:MM:SS' for the task so far."""
        elapsed = time.monotonic() - self._start
        eta = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        return f"{self.tokens_per_second:,.0f} tok/s, ETA {format_duration(eta) if self.done else '?'}"

    def line(self) -> str:
        """The plain status line: label, counts, percentage, tokens/s, ETA."""
        elapsed = time.monotonic() - self._start
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        eta_text = format_duration(eta) if self.done else "?"
        return (f"{self.label}: {self.done}/{self.total} responses ({percent:.0f}%), "
                f"{self.tokens_per_second:,.0f} tok/s, elapsed {format_duration(elapsed)}, ETA {eta_text}")

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_line = time.monotonic()

    def close(self) -> None:
        """Stop the bar, or print the final plain line."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._display is not None:
                self._display.remove(self._task)
            elif self.mode == "rich":
                self._bar.stop()
            elif self.mode == "plain" and self.done and self._next_fraction <= 1.0:
                self._print_line()

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def open_progress(progress: "str | ProgressReporter | None", total: int) -> Iterator[ProgressReporter]:
    """A reporter for one generate call: a new one for a label, the caller's own, or a silent one."""
    if isinstance(progress, ProgressReporter):
        yield progress
        return
    mode: Mode | None = "silent" if progress is None else None
    with ProgressReporter(progress or "", total, mode=mode) as reporter:
        yield reporter
