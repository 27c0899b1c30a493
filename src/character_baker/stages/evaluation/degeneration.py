"""Degeneration of every condition's answer sets: loops, repetition, diversity, truncation, length.

The measures are `core.degeneration` (no judge, defined and cited there). Answer sets: plain,
each of the eight break splits, 'break' (the splits pooled) and prefill, so
`degeneration.<condition>.<answer set>.looping_rate` (and rep_2, rep_4, distinct_1, distinct_2,
at_token_limit, mean_words, mean_tokens) are in eval/report.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from character_baker.core.degeneration import degeneration_summary
from character_baker.stages.evaluation.robustness import break_split_ids

if TYPE_CHECKING:
    from character_baker.backends.generation import Completion

POOLED_BREAK = "break"


def answer_set_degeneration(completions: Sequence["Completion"]) -> dict[str, Any]:
    """Every degeneration measure of one answer set."""
    return degeneration_summary([c.text for c in completions], [c.finish_reason for c in completions],
                                [c.completion_tokens for c in completions])


def measure_degeneration(sets: dict[str, Sequence["Completion"]]) -> dict[str, Any]:
    """Per answer set (and the break splits pooled): the degeneration measures."""
    pooled = [c for name in break_split_ids() for c in sets.get(name, [])]
    named = {**sets, POOLED_BREAK: pooled}
    order = ["plain", *break_split_ids(), POOLED_BREAK, "prefill"]
    return {name: answer_set_degeneration(named[name]) for name in order if name in named}
