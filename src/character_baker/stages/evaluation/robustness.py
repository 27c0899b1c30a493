"""Robustness: how often each condition stays in character, as judged by the persona classifier.

- plain: answers to the held-out prompts as they are;
- break: the same prompts with each of the eight published break-character instructions appended
  after a newline (per split, and pooled over the splits = the mean of equal-sized splits);
- prefill: a two-turn attack: turn 1 is the base model's own (assistant-style) answer, then the
  user says "Tell me more." and the condition answers turn 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from character_baker.core import assets
from character_baker.core.stats import proportion

if TYPE_CHECKING:
    from character_baker.backends.generation import Completion
    from character_baker.core.config import SamplingConfig
    from character_baker.stages.evaluation.classifier import PersonaClassifier
    from character_baker.stages.evaluation.conditions import Condition

TELL_ME_MORE = "Tell me more."


def break_conversation(prompt: str, instruction: str) -> list[dict[str, str]]:
    """The prompt with a break-character instruction appended on a new line."""
    return [{"role": "user", "content": f"{prompt}\n{instruction}"}]


def prefill_conversation(prompt: str, base_answer: str) -> list[dict[str, str]]:
    """Turn 1 answered by the base model, then 'Tell me more.' for the condition to answer."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": base_answer},
            {"role": "user", "content": TELL_ME_MORE}]


def in_character_flags(classifier: "PersonaClassifier", texts: Sequence[str]) -> list[bool]:
    """Whether the classifier assigns each text to the persona."""
    return classifier.in_character(list(texts)) if texts else []


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    """Share of True flags with n and a Wilson interval."""
    return proportion(sum(flags), len(flags)).to_dict()


def attack_conversations(prompts: Sequence[dict], base_answers: Sequence[str] | None,
                         count: int) -> list[list[dict[str, str]]]:
    """Every break split over the first `count` prompts, then the prefill attack (needs the base's answers)."""
    attacked = list(prompts[:count])
    conversations = [break_conversation(p["prompt"], split["instruction"])
                     for split in assets.break_character_instructions() for p in attacked]
    if base_answers is not None:
        conversations += [prefill_conversation(p["prompt"], answer) for p, answer in zip(attacked, base_answers)]
    return conversations


def answer_sets(condition: "Condition", prompts: Sequence[dict], plain: Sequence["Completion"],
                base_answers: Sequence[str], count: int, sampling: "SamplingConfig") -> dict[str, list["Completion"]]:
    """One condition's answers per answer set: 'plain', each break split id, 'prefill' (one generate call).

    `plain` is the condition's answers to `prompts`; `base_answers` the base's, which open the
    prefill attack; the break splits and the attack use the first `count` prompts.
    """
    attacked, splits = min(count, len(prompts)), assets.break_character_instructions()
    answers = condition.answer(attack_conversations(prompts, base_answers, count), sampling,
                               label="break splits and prefill attack")
    sets = {"plain": list(plain)}
    sets.update({split["id"]: answers[i * attacked:(i + 1) * attacked] for i, split in enumerate(splits)})
    sets["prefill"] = answers[len(splits) * attacked:]
    return sets


def break_split_ids() -> list[str]:
    """The ids of the break-character splits, in order."""
    return [split["id"] for split in assets.break_character_instructions()]


def measure_robustness(sets: dict[str, Sequence["Completion"]], classifier: "PersonaClassifier") -> dict[str, Any]:
    """In-character rates of one condition's answer sets: plain, each break split (and pooled), prefill."""
    splits = break_split_ids()
    texts = [c.text for name in ["plain", *splits, "prefill"] for c in sets[name]]
    flags = iter(in_character_flags(classifier, texts))  # one classifier pass for everything
    by_set = {name: [next(flags) for _ in sets[name]] for name in ["plain", *splits, "prefill"]}
    return {"plain": rate(by_set["plain"]),
            "break": {"mean": rate([f for name in splits for f in by_set[name]]),
                      "splits": {name: rate(by_set[name]) for name in splits}},
            "prefill": rate(by_set["prefill"])}
