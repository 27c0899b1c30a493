"""Shipped text assets: prompt sets, persona hints, evaluation instructions, trait words.

Every file lives in `character_baker/assets/` and is read through `importlib.resources`, so
the loader works from a source checkout, an editable install and a wheel alike. Files are
parsed once (cached) and every call returns a fresh copy, so a caller that edits what it got
back cannot change what the next caller sees.

| function | file | what it is |
|---|---|---|
| `general_prompts` | general_prompts.jsonl | user prompts for training-data generation, 11 categories |
| `eval_prompts` | eval_prompts.jsonl | held-out prompts, same categories, no near-duplicates of the above |
| `persona_hints` | persona_hints.json | our hints that pull a model back to a generic assistant voice (training only) |
| `break_character_instructions` | break_character.json | the 8 published break-character suffixes (evaluation only) |
| `synthesis_parts` | synthesis.json | audience x scenario x objective x constraint lists and sentence templates |
| `reflective_instructions` | reflective_instructions.json | the 10 self-reflection instructions |
| `greetings` | greetings.json | openers for self-interaction conversations |
| `trait_words`, `preference_instructions` | traits.json | one-word traits and the 3 revealed-preference conditions |
| `capability_items` | capability_set.jsonl | short-answer arithmetic and knowledge items with aliases (generative) |
| `multiple_choice_items` | capability_mc.jsonl | our held-out multiple-choice items: knowledge, arithmetic, commonsense, reading |
| `calibration_items` | calibration_mc.jsonl | multiple-choice items for choosing the persona strength, disjoint from the above |
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any

CATEGORIES: tuple[str, ...] = (
    "math_reasoning",
    "science",
    "coding",
    "household",
    "recipes",
    "advice",
    "creative_writing",
    "casual_chat",
    "confrontational",
    "identity",
    "harmful",
)

_ASSET_DIR = "assets"


@lru_cache(maxsize=None)
def _read_text(filename: str) -> str:
    """The text of one shipped asset file."""
    asset = resources.files("character_baker").joinpath(_ASSET_DIR).joinpath(filename)
    return asset.read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _load_json(filename: str) -> Any:
    """One parsed JSON asset (cached; never hand this object out directly)."""
    return json.loads(_read_text(filename))


@lru_cache(maxsize=None)
def _load_jsonl(filename: str) -> tuple[dict, ...]:
    """One parsed JSON-lines asset, blank lines skipped (cached; never hand it out directly)."""
    return tuple(json.loads(line) for line in _read_text(filename).splitlines() if line.strip())


def general_prompts() -> list[dict]:
    """General user prompts `{id, prompt, category}` used to generate training data."""
    return copy.deepcopy(list(_load_jsonl("general_prompts.jsonl")))


def eval_prompts() -> list[dict]:
    """Held-out prompts `{id, prompt, category}`; never used for training."""
    return copy.deepcopy(list(_load_jsonl("eval_prompts.jsonl")))


def persona_hints() -> list[str]:
    """Our hint sentences that try to pull a model back to a generic assistant voice."""
    return list(_load_json("persona_hints.json"))


def break_character_instructions() -> list[dict]:
    """The eight published break-character suffixes `{id, instruction}`; evaluation only."""
    return copy.deepcopy(_load_json("break_character.json")["instructions"])


def synthesis_parts() -> dict:
    """Lists `audiences`, `scenarios`, `objectives`, `constraints` and `templates` for synthesis."""
    return copy.deepcopy(_load_json("synthesis.json"))


def reflective_instructions() -> list[dict]:
    """The ten self-reflection instructions `{id, topic, instruction}`."""
    return copy.deepcopy(_load_json("reflective_instructions.json"))


def greetings() -> list[str]:
    """Opening lines for self-interaction conversations."""
    return list(_load_json("greetings.json"))


def trait_words() -> list[str]:
    """About 150 one-word character traits for the revealed-preference evaluation."""
    return list(_load_json("traits.json")["traits"])


def preference_instructions() -> list[str]:
    """The three revealed-preference conditions: feels most like you, would adopt, random."""
    return list(_load_json("traits.json")["instructions"])


def capability_items() -> list[dict]:
    """Short-answer items `{id, question, answer, aliases, kind}` for capability retention."""
    return copy.deepcopy(list(_load_jsonl("capability_set.jsonl")))


MC_CATEGORIES: tuple[str, ...] = ("knowledge", "arithmetic", "commonsense", "reading")


def multiple_choice_items() -> list[dict]:
    """Held-out multiple-choice items `{id, category, question, choices, answer, passage?}` (answer = index).

    Written for this project (not taken from a public benchmark) and easy on purpose: a 135M chat
    model scores clearly above chance, so a loss of capability shows as a drop.
    """
    return copy.deepcopy(list(_load_jsonl("capability_mc.jsonl")))


def calibration_items() -> list[dict]:
    """Calibration multiple-choice items, same fields as `multiple_choice_items`; disjoint from the held-out set."""
    return copy.deepcopy(list(_load_jsonl("calibration_mc.jsonl")))
