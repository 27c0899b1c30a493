"""Identity and leaks: does the condition answer identity probes as the persona, or as the base model?

Per answer to an identity prompt ("who are you?"):
- persona_name: it uses the persona's name (the full name or a distinctive part of it);
- base_name: it uses the base model's name (`eval.base_model_names`, else read from the model id);
- assistant_style: the persona classifier puts it in the 'assistant' class;
- assistant_phrase_keyword: it contains a stock assistant phrase (`distill.assistant_phrases`).
  Reported for reference only: keyword lists alone have a large false-positive floor, which is
  why the classifier's verdict is the leak measure.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Sequence

from character_baker.core.text import contains_phrase, name_variants
from character_baker.stages.evaluation.classifier import ASSISTANT
from character_baker.stages.evaluation.conditions import user_turns
from character_baker.core.stats import proportion

if TYPE_CHECKING:
    from character_baker.core.config import SamplingConfig
    from character_baker.stages.evaluation.classifier import PersonaClassifier
    from character_baker.stages.evaluation.conditions import Condition

_SIZE_OR_ROLE = re.compile(r"^(\d+(\.\d+)?[mbk]|instruct|chat|it|base|hf|v\d.*|\d+)$", re.IGNORECASE)


def base_model_names(model_ref: str, configured: Sequence[str] = ()) -> list[str]:
    """Names a base model calls itself: the configured ones, else from its id ('SmolLM2-135M-Instruct' -> SmolLM2, SmolLM)."""
    if configured:
        return list(configured)
    stem = PurePath(model_ref.rstrip("/")).name.removesuffix(".gguf")
    parts = [part for part in re.split(r"[-_\s]+", stem) if part and not _SIZE_OR_ROLE.match(part)]
    if not parts:
        return []
    names = {parts[0], re.sub(r"[\d.]+$", "", parts[0])}
    return sorted(name for name in names if len(name) >= 3)


def mentions(text: str, names: Sequence[str]) -> bool:
    """True when any name occurs in the text as a whole word, case-insensitively."""
    return any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) for name in names)


def identity_flags(texts: Sequence[str], persona_name: str, base_names: Sequence[str],
                   phrases: Sequence[str]) -> dict[str, list[bool]]:
    """Per answer: persona name used, base-model name used, stock assistant phrase present."""
    persona = sorted(name_variants(persona_name), key=len, reverse=True)
    return {"persona_name": [mentions(t, persona) for t in texts],
            "base_name": [mentions(t, base_names) for t in texts],
            "assistant_phrase_keyword": [contains_phrase(t, list(phrases)) is not None for t in texts]}


def measure_identity(condition: "Condition", prompts: Sequence[dict], classifier: "PersonaClassifier",
                     persona_name: str, base_names: Sequence[str], phrases: Sequence[str],
                     sampling: "SamplingConfig") -> dict[str, Any]:
    """Shares of identity answers naming the persona, naming the base model, and classified as assistant-style."""
    texts = [c.text for c in condition.answer(user_turns(prompts), sampling, label="identity probes")]
    flags = identity_flags(texts, persona_name, base_names, phrases)
    flags["assistant_style"] = [label == ASSISTANT for label in classifier.predict(texts)] if texts else []
    return {name: proportion(sum(values), len(values)).to_dict() for name, values in flags.items()}
