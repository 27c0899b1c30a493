"""Resolve a recipe from its layers and remember where every value came from.

Layers, later winning: defaults < preset < constitution `recipe:` < --recipe FILE < --set.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from character_baker.core.config import Recipe
from character_baker.core.errors import Problem, UserError
from character_baker.core.validation import inner_model, problems_from_validation
from character_baker.core.yamlio import LineMap, line_for, load_yaml_with_lines, parse_yaml_document

# The fewest monitor answers that exercise the checks on a tiny model.
SMOKE_MONITOR = {"every": 2, "prompts": 4, "max_new_tokens": 16}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Tiny sizes: the whole chain finishes in minutes on 2 CPU cores with a tiny model.
    "smoke": {
        "prompts": {"questions_per_trait": 6, "general_prompts": 12, "synthesized_prompts": 4, "checkable_prompts": 4},
        # Tiny teachers lose the 1,800-token published prompt; the brief card is also ~20x cheaper to prefill.
        "generation": {"persona_prompt": "brief",
                       # On a CPU a decode step costs about the same for 4 rows as for 64 (it reads every
                       # weight once), so the smoke run answers in few, wide batches. Chosen answers must
                       # end within the limit (the `truncated` filter), so the teacher gets more room.
                       "teacher": {"batch_size": 128, "sampling": {"max_new_tokens": 96, "repetition_penalty": 1.1}},
                       "student": {"batch_size": 128, "sampling": {"max_new_tokens": 48}},
                       "prompt_writer": {"batch_size": 128, "sampling": {"max_new_tokens": 32}},
                       "judge": {"batch_size": 128}},
        "distill": {"best_of": 2, "samples_per_prompt": 1, "batch_size": 4, "micro_batch_size": 2, "max_length": 256,
                    "save_steps": 2, "lora": {"r": 8, "alpha": 16}, "monitor": SMOKE_MONITOR},
        "introspect": {"reflections_per_instruction": 1, "interactions": 2, "turns": 2, "batch_size": 4,
                       "micro_batch_size": 2, "max_length": 512, "save_steps": 2, "lora": {"r": 8, "alpha": 16},
                       "monitor": SMOKE_MONITOR},
        "sdft": {"prompts": 8, "batch_size": 4, "micro_batch_size": 2, "max_length": 256, "save_steps": 2,
                 "lora": {"r": 8, "alpha": 16}, "monitor": SMOKE_MONITOR},
        "profile": {"prompts": 8, "top_n_fallback": 4},
        "merge": {"svd_rank": 8},
        "calibrate": {"scales": [0.5, 1.0], "prompts": 4, "kl_prompts": 1, "max_new_tokens": 16, "mc_items": 8},
        # Every measure runs, on the fewest prompts that exercise it: a 135M model on 2 CPU cores
        # answers ~5 prompts a second, and eval asks four conditions.
        # Multiple choice: 3 items per category (~10 s per condition for SmolLM2 on a CPU; wide intervals).
        "eval": {"prompts": 4, "elo_pairs": 2, "coherence_pairs": 2, "robustness_prompts": 1, "identity_prompts": 2,
                 "harmful_prompts": 2, "capability_items": 4, "capability_max_new_tokens": 16, "mc_items": 12,
                 "kl_prompts": 1, "bootstrap": 50, "sample_answers": 2},
    },
    # The README's main command: SmolLM2-135M on 2 CPU cores in under 8 minutes, sized so the character
    # visibly takes. Measured (2 cores, 2026-12-02): introspection at this size trained on 11 examples in
    # 2 steps and moved nothing, so its minute goes to distillation; checkable prompts kept 0 of 6 (the
    # 135M teacher gets arithmetic wrong in character). The brief card alone made the teacher use the
    # character's words in 27% of answers and the trained model read 29% in character (base 0%); the
    # two shortest constitution examples as earlier teacher turns (`distill.teacher_examples`) took the
    # teacher to 74% and the trained model to 71% (7 min 49 s at best of 4 and 3 epochs; best of 3 and 2
    # epochs: 75%, 6 min 51 s). The `no_voice_cue` filter added little once the teacher had examples
    # (55 of 60 chosen answers carried a cue either way) and dropped every pair of the sarcastic
    # constitution, whose vocabulary is phrases the teacher never says verbatim, so it is off. Calibration
    # picks the strength on 32 MC items; eval compares the trained model with the base only.
    "demo": {
        "method": ["distill"],
        "prompts": {"questions_per_trait": 4, "general_prompts": 20, "synthesized_prompts": 0, "checkable_prompts": 0},
        "generation": {"persona_prompt": "brief",
                       "teacher": {"batch_size": 128, "sampling": {"max_new_tokens": 64, "repetition_penalty": 1.1}},
                       "student": {"batch_size": 128, "sampling": {"max_new_tokens": 64}},
                       "prompt_writer": {"batch_size": 128, "sampling": {"max_new_tokens": 32}},
                       "judge": {"batch_size": 128}},
        "distill": {"best_of": 3, "samples_per_prompt": 1, "batch_size": 8, "micro_batch_size": 4,
                    "learning_rate": 5e-4, "epochs": 2, "max_length": 288, "save_steps": 6, "heldout_fraction": 0.1,
                    "lora": {"r": 16, "alpha": 32}, "teacher_examples": 2,
                    "monitor": {"every": 6, "prompts": 4, "max_new_tokens": 40, "patience": 2}},
        "sdft": {"prompts": 32, "batch_size": 8, "micro_batch_size": 4, "max_length": 384,
                 "lora": {"r": 16, "alpha": 32}},
        "profile": {"prompts": 16},
        "merge": {"svd_rank": 16},
        "calibrate": {"scales": [0.75, 1.0], "prompts": 6, "kl_prompts": 2, "max_new_tokens": 40,
                      "mc_items": 32},
        "eval": {"conditions": ["base", "trained"], "prompts": 24, "robustness_prompts": 3, "identity_prompts": 3,
                 "harmful_prompts": 3, "elo_pairs": 4, "coherence_pairs": 3, "capability_items": 6,
                 "capability_max_new_tokens": 16, "mc_items": 32,
                 "kl_prompts": 3, "bootstrap": 100, "sample_answers": 3},
    },
    # 100M-1B models on one GPU (or patiently on a CPU).
    "small": {
        "prompts": {"questions_per_trait": 20, "general_prompts": 300, "synthesized_prompts": 50},
        "generation": {"persona_prompt": "brief",
                       "teacher": {"batch_size": 256, "sampling": {"max_new_tokens": 512, "repetition_penalty": 1.1}},
                       "student": {"batch_size": 256, "sampling": {"max_new_tokens": 512}},
                       "prompt_writer": {"batch_size": 256}, "judge": {"batch_size": 256},
                       # 100M-class models degenerate into repetition on long free-form reflections.
                       "introspector": {"batch_size": 256, "sampling": {"max_new_tokens": 256,
                                                                        "repetition_penalty": 1.1}}},
        # Small models take ~30-80 optimiser steps here; the published lr (tuned for 7-8B) barely moves them.
        "distill": {"best_of": 4, "samples_per_prompt": 2, "batch_size": 16, "micro_batch_size": 8, "max_length": 1024,
                    "learning_rate": 2e-4, "epochs": 2},
        "introspect": {"reflections_per_instruction": 50, "interactions": 100, "turns": 6, "batch_size": 16,
                       "micro_batch_size": 4, "max_length": 2048},
        "sdft": {"prompts": 200, "batch_size": 16, "micro_batch_size": 8},
        "profile": {"prompts": 100},
        # A few hundred answers are too few for the published classifier recipe (lr 5e-4, one epoch
        # on thousands): on ~600 answers it can collapse to one class, so train gentler and longer.
        "eval": {"prompts": 100, "elo_pairs": 150, "coherence_pairs": 50, "classifier_lr": 1e-4,
                 "classifier_epochs": 3},
    },
    # The published data sizes (DESIGN.md section 1); the schema defaults already are these.
    "paper": {"prompts": {"questions_per_trait": 50, "general_prompts": 600}},
}

DEFAULTS_SOURCE = "default"


@dataclass
class Layer:
    """One layer of recipe values and where it came from."""

    name: str
    values: dict[str, Any]
    file: str = "<command line>"
    lines: LineMap = field(default_factory=dict)
    prefix: tuple = ()


@dataclass
class ResolvedRecipe:
    """The validated recipe and, per dotted leaf key, the layer that set it."""

    recipe: Recipe
    sources: dict[str, str]

    def source_of(self, dotted: str) -> str:
        """The layer that set `dotted`, or 'default'."""
        return self.sources.get(dotted, DEFAULTS_SOURCE)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _known_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        section = inner_model(info.annotation)  # also finds the model inside Optional[...]
        if section is not None and not str(info.annotation).startswith(("list", "dict")):
            paths.append(f"{prefix}{name}")
            paths.extend(_known_paths(section, f"{prefix}{name}."))
        else:
            paths.append(f"{prefix}{name}")
    return paths


def parse_set_overrides(pairs: list[str]) -> Layer:
    """Turn `a.b.c=value` strings into a nested dict layer; values are parsed as YAML scalars."""
    values: dict[str, Any] = {}
    problems = []
    known = _known_paths()
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem("--set", pair, "expected KEY=VALUE", "write e.g. --set distill.lora.r=32"))
            continue
        if key not in known and not any(k.startswith(key + ".") for k in known) and not key.startswith("merge.weights."):
            guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            fix = f"did you mean '{guess[0]}'?" if guess else "see `character-baker recipe show` for the keys"
            problems.append(Problem("--set", key, f"unknown recipe key '{key}'", fix))
            continue
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_yaml_document(raw, f"--set {key}")[0] if raw.strip() else None
    if problems:
        raise UserError(problems)
    return Layer(name="--set", values=values)


def load_recipe_file(path: str | Path) -> Layer:
    """Read a recipe YAML file as a layer."""
    data, lines = load_yaml_with_lines(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError.single(str(path), "", "a recipe file must be a YAML mapping", "write keys like `distill: {beta: 0.1}`")
    return Layer(name=f"--recipe {path}", values=data, file=str(path), lines=lines)


def default_values(model: BaseModel | None = None) -> dict[str, Any]:
    """The recipe defaults as nested dicts, the base every layer merges into.

    Merging over the full defaults (not an empty dict) keeps the defaults of a section built by a
    factory: a preset that sets only `generation.judge.batch_size` must keep the judge's greedy,
    16-token sampling rather than fall back to SamplingConfig's own defaults. Plain mapping fields
    (e.g. `merge.weights`) are left out, so a layer that sets one replaces it whole.
    """
    model = model if model is not None else Recipe()
    dumped = model.model_dump(mode="json")
    values: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            values[name] = default_values(value)
        elif not isinstance(value, dict):
            values[name] = dumped[name]
    return values


def resolve_recipe(layers: list[Layer], preset: str | None = None) -> ResolvedRecipe:
    """Merge layers over the defaults and a preset; validate; record each value's source."""
    chosen = preset
    for layer in layers:
        chosen = layer.values.get("preset", chosen) if preset is None else preset
    chosen = chosen or "default"
    if chosen not in PRESETS:
        guess = difflib.get_close_matches(str(chosen), list(PRESETS), n=1)
        raise UserError.single("--preset", "preset", f"unknown preset '{chosen}'",
                               f"did you mean '{guess[0]}'?" if guess else f"use one of {', '.join(PRESETS)}")
    all_layers = [Layer(name=f"preset {chosen}", values=PRESETS[chosen])] + layers
    merged: dict[str, Any] = default_values()
    sources: dict[str, str] = {}
    for layer in all_layers:
        merged = _deep_merge(merged, layer.values)
        for dotted in _flatten(layer.values):
            sources[dotted] = layer.name
    merged["preset"] = chosen
    if preset is not None:
        sources["preset"] = "--preset"
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as exc:
        raise UserError(_attribute(exc, all_layers)) from None
    return ResolvedRecipe(recipe=recipe, sources=sources)


def _attribute(exc: ValidationError, layers: list[Layer]) -> list[Problem]:
    """Name the file and line of the layer that set each bad value."""
    problems = []
    for problem in problems_from_validation(exc, Recipe, "<recipe>"):
        loc = tuple(int(p) if p.isdigit() else p for p in problem.field.replace("[", ".").replace("]", "").split("."))
        owner = next((layer for layer in reversed(layers) if _has_prefix(layer.values, loc)), layers[-1])
        line = line_for(owner.lines, owner.prefix + loc) if owner.lines else None
        field_path = ".".join(str(p) for p in owner.prefix) + "." + problem.field if owner.prefix else problem.field
        problems.append(Problem(owner.file, field_path, problem.message, problem.fix, line))
    return problems


def _has_prefix(values: Any, loc: tuple) -> bool:
    node = values
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


def resolve_recorded_recipe(recorded: dict[str, Any], manifest_file: str, sets: list[str] | None = None) -> ResolvedRecipe:
    """The recipe a run recorded in its manifest (preset included), with `--set` overrides on top."""
    layers = [Layer(name=f"run {manifest_file}", values=recorded, file=manifest_file)]
    if sets:
        layers.append(parse_set_overrides(sets))
    return resolve_recipe(layers)
