"""The chain's progress display: plain lines off a terminal, one shared display on one, the run's ETA."""

from __future__ import annotations

import io

from character_baker.backends.generation.progress import ProgressReporter
from character_baker.core.progress import ChainDisplay, chain_display, current_display


def test_plain_lines_name_the_stage_and_the_rescaled_eta():
    stream = io.StringIO()
    display = ChainDisplay(["prompts", "distill"], {"prompts": 10.0, "distill": 100.0}, stream=stream, terminal=False)
    display.stage_started("prompts")
    display.stage_finished("prompts", seconds=80.0)  # 8x its estimate: (80 + 60) / (10 + 60) = 2x for the rest
    assert display.eta_seconds() == 200.0
    display.stage_started("distill")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[stage 1/2 prompts] started; elapsed 0:00:00, run ETA 0:01:50")
    assert lines[1] == "[stage 1/2 prompts] ran in 80.0s; run ETA 0:03:20"
    assert lines[2].startswith("[stage 2/2 distill] started;")


def test_a_skipped_stage_counts_as_on_time():
    display = ChainDisplay(["a", "b"], {"a": 50.0, "b": 50.0}, stream=io.StringIO(), terminal=False)
    display.stage_finished("a", seconds=0.1, status="skipped")
    assert display.eta_seconds() == 50.0


def test_reporters_put_their_bars_in_the_open_terminal_display():
    stream = io.StringIO()
    with chain_display(["distill_data"], {"distill_data": 5.0}, stream=stream, terminal=True) as display:
        assert current_display() is display
        reporter = ProgressReporter("teacher", 4, mode="rich", stream=stream)
        assert reporter._display is display and reporter._bar is None  # no second live display
        reporter.advance(4, tokens=40)
        assert display.progress.tasks[-1].completed == 4
        reporter.close()
        assert len(display.progress.tasks) == 1  # the task bar is gone, the run's line stays
    assert current_display() is None
