"""What `serve RUN|MODEL` serves: model ids, the weights and adapter behind each, the page's panes.

    target = resolve_target("runs/pirate", engine="transformers")
    target.models   # (ServedModel("pirate", base, adapter=runs/pirate/adapters/persona), ServedModel(base id, base))
    target.panes    # (the baked character, no system prompt), (the base with the teacher system prompt)

A run directory (a folder with manifest.json, or a name under runs/) serves its baked character
under the constitution's name, and the base model under its own id for comparison:

- transformers engine: base + adapters/persona/ when the run has it (one copy of the weights
  serves both ids: the adapter is switched on or off per request), else model/ (the merged
  weights) and the base as a second model.
- vLLM engine: one set of weights per process, so model/ alone when the run has it, else the
  base with the persona LoRA (`--enable-lora`), which serves both ids.

Any other reference (Hub id, model folder, .gguf file) serves that one model. Model ids are
dictionary keys only: nothing a client sends is ever used as a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from character_baker.core.config import ModelsConfig, Recipe
from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir

Engine = Literal["transformers", "vllm"]
PERSONA_ADAPTER = ("adapters", "persona")
MERGED_MODEL = "model"


@dataclass(frozen=True)
class ServedModel:
    """One model id clients can name: the weights to load and an optional LoRA adapter on top."""

    id: str
    weights: str
    adapter: Path | None = None


@dataclass(frozen=True)
class Pane:
    """One column of the chat page: a title, the model it asks, and the system prompt it sends."""

    title: str
    model: str
    system_prompt: str | None = None


@dataclass(frozen=True)
class ServeTarget:
    """Everything `serve` needs: the served models (first = the character), panes, load settings."""

    models: tuple[ServedModel, ...]
    panes: tuple[Pane, ...]
    models_config: ModelsConfig = field(default_factory=ModelsConfig)
    notes: tuple[str, ...] = ()


def served_id(text: str) -> str:
    """A model id from a name or reference: letters, digits, '.', '_', '-' and '/' only."""
    return re.sub(r"[^A-Za-z0-9._/-]+", "-", text).strip("-/") or "model"


def reference_id(ref: str) -> str:
    """The id a model reference is served under: a Hub id as is, a folder's name, a .gguf file's stem."""
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        return served_id(path.stem)
    if path.exists() or ref.startswith((".", "/", "~")):
        return served_id(path.resolve().name)
    return served_id(ref)


def find_run(ref: str, runs_root: Path = Path("runs")) -> RunDir | None:
    """The run directory `ref` names (a folder with manifest.json, or a name under runs_root), else None."""
    for candidate in (Path(ref).expanduser(), runs_root / ref):
        try:
            return RunDir.open(candidate)
        except FileNotFoundError:
            continue
    return None


def resolve_target(ref: str, *, engine: Engine, runs_root: Path = Path("runs")) -> ServeTarget:
    """What to serve for `serve REF`: a run's baked character (and its base), or one model."""
    run = find_run(ref, runs_root)
    if run is None:
        model = ServedModel(id=reference_id(ref), weights=ref)
        return ServeTarget(models=(model,), panes=(Pane(title=model.id, model=model.id),))
    return _run_target(run, engine)


def _run_recipe(run: RunDir) -> Recipe:
    """The resolved recipe the run was trained with (from its manifest)."""
    try:
        return Recipe.model_validate(run.manifest().get("recipe") or {})
    except ValueError as error:
        raise UserError.single(str(run.manifest_path), "recipe", f"the run's recorded recipe is invalid ({error})",
                               "rerun the run's stages with this version of character-baker") from None


def _baked_model(run: RunDir, engine: Engine, base: str, character_id: str) -> ServedModel:
    """The character's weights: base + persona adapter or the merged model, as the engine prefers."""
    adapter = run.path(*PERSONA_ADAPTER)
    merged = run.path(MERGED_MODEL)
    has_adapter = (adapter / "adapter_config.json").is_file()
    has_merged = (merged / "config.json").is_file()
    if not (has_adapter or has_merged):
        raise UserError.single(str(run.root), "model", "this run has no baked model yet: neither model/ nor "
                               "adapters/persona/ exists", "finish the run first: `character-baker train CONSTITUTION`")
    if has_merged and (engine == "vllm" or not has_adapter):
        return ServedModel(id=character_id, weights=str(merged))
    return ServedModel(id=character_id, weights=base, adapter=adapter)


def _run_target(run: RunDir, engine: Engine) -> ServeTarget:
    """A run's character (no system prompt) and, where the engine can, its base with the teacher prompt."""
    recipe = _run_recipe(run)
    recorded = run.manifest().get("constitution") or {}
    character_id = served_id(recorded.get("name") or run.name)
    character = _baked_model(run, engine, recipe.models.base, character_id)
    base_id = reference_id(recipe.models.base)
    base = ServedModel(id=base_id if base_id != character_id else f"{base_id}-base", weights=recipe.models.base)
    serves_base = character.adapter is not None or engine == "transformers"
    models = (character, base) if serves_base else (character,)
    title, system_prompt, notes = _constitution_prompt(run, recorded, recipe.generation.persona_prompt)
    panes = [Pane(title=f"{title or character_id} (baked, no system prompt)", model=character_id)]
    if serves_base and system_prompt:
        panes.append(Pane(title=f"{base.id} + constitution as system prompt", model=base.id,
                          system_prompt=system_prompt))
    return ServeTarget(models=models, panes=tuple(panes), models_config=recipe.models, notes=tuple(notes))


def _constitution_prompt(run: RunDir, recorded: dict, style: str) -> tuple[str | None, str | None, list[str]]:
    """(persona name, persona system prompt in the run's style, notes) from the run's constitution, if it loads."""
    from character_baker.core.constitution import load_constitution
    from character_baker.core.system_prompts import persona_system_prompt

    path = recorded.get("path")
    if not path:
        return None, None, [f"{run.manifest_path} records no constitution path: the page shows no base-model pane"]
    try:
        constitution = load_constitution(path)
    except UserError as error:
        return None, None, [f"the run's constitution {path} does not load ({error}): the page shows no base-model pane"]
    notes = []
    if recorded.get("hash") and recorded["hash"] != constitution.content_hash():
        notes.append(f"{path} changed since this run was trained: the base-model pane uses the file as it is now")
    return constitution.persona.name, persona_system_prompt(constitution, style), notes
