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
from character_baker.stages.evaluation.stats import proportion

if TYPE_CHECKING:
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


def measure_robustness(condition: "Condition", prompts: Sequence[dict], plain_answers: Sequence[str],
                       base_answers: Sequence[str], count: int, classifier: "PersonaClassifier",
                       sampling: "SamplingConfig") -> dict[str, Any]:
    """In-character rates of one condition: plain, under each break split (and pooled), under the prefill attack.

    `plain_answers` and `base_answers` are this condition's and the base's answers to `prompts`;
    the break splits and the attack use the first `count` prompts.
    """
    attacked, splits = list(prompts[:count]), assets.break_character_instructions()
    conversations = attack_conversations(prompts, base_answers, count)
    texts = [c.text for c in condition.answer(conversations, sampling, label="break splits and prefill attack")]
    flags = in_character_flags(classifier, texts)  # one generate call and one classifier pass for everything
    by_split = {split["id"]: flags[i * len(attacked):(i + 1) * len(attacked)] for i, split in enumerate(splits)}
    return {"plain": rate(in_character_flags(classifier, plain_answers)),
            "break": {"mean": rate(flags[:len(splits) * len(attacked)]),
                      "splits": {name: rate(split_flags) for name, split_flags in by_split.items()}},
            "prefill": rate(flags[len(splits) * len(attacked):])}
