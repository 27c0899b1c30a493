"""Coherence: a pairwise judge between two conditions' answers, calibrated by swapping the order.

Each prompt is judged twice, once with each condition's answer first. Only order-consistent
verdicts count: a win needs the same answer preferred in both orders; INVALID in both orders
(neither answer coherent enough to judge) is counted apart; anything else is inconsistent and
dropped, and replies that do not parse are counted. Win rate = wins / consistent decisive
verdicts, with standard error sqrt(p(1-p)/n). Every condition is compared with one reference:
'trained' when present, else 'prompted'.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, Sequence

from character_baker.stages.evaluation.judge import INVALID, Judge, coherence_question
from character_baker.core.stats import win_rate

Outcome = Literal["first", "second", "invalid", "inconsistent", "unparsed"]


def reference_condition(names: Sequence[str]) -> str:
    """The condition every other one is compared with: 'trained' if present, else 'prompted'."""
    return "trained" if "trained" in names else "prompted"


def order_consistent(forward: str | None, swapped: str | None) -> Outcome:
    """Combine the verdicts of (A first, B second) and (B first, A second) into one outcome for A vs B."""
    if forward is None or swapped is None:
        return "unparsed"
    if (forward, swapped) == ("1", "2"):
        return "first"
    if (forward, swapped) == ("2", "1"):
        return "second"
    if forward == swapped == INVALID:
        return "invalid"
    return "inconsistent"


def measure_coherence(judge: Judge, prompts: Sequence[dict], answers: Sequence[str], reference_answers: Sequence[str],
                      traits: str, label: str) -> dict[str, Any]:
    """Win rate of `answers` against `reference_answers`, both orders, only order-consistent verdicts kept."""
    tasks = []
    for prompt, answer, reference in zip(prompts, answers, reference_answers):
        tasks.append(coherence_question(prompt["prompt"], answer, reference, traits))
        tasks.append(coherence_question(prompt["prompt"], reference, answer, traits))
    verdicts = judge.decide(tasks, progress=f"judge: coherence {label}")
    outcomes = Counter(order_consistent(verdicts[i], verdicts[i + 1]) for i in range(0, len(verdicts), 2))
    decisive = outcomes["first"] + outcomes["second"]
    return {"win_rate": win_rate(outcomes["first"], decisive).to_dict(), "prompts": len(prompts),
            "wins": outcomes["first"], "losses": outcomes["second"], "invalid": outcomes["invalid"],
            "inconsistent": outcomes["inconsistent"], "unparsed": outcomes["unparsed"]}
