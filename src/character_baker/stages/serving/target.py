"""What `serve REF...` serves: model ids, the weights and adapter behind each, the page's characters.

    target = resolve_target(["runs/pirate", "runs/sarcastic"], engine="transformers")
    target.models      # pirate (base + its persona adapter), sarcastic (base + its adapter), the base itself
    target.characters  # the page's picker: each character's pane, and its base prompted with its constitution

Each reference is a run directory (a folder with manifest.json, or a name under runs/), a folder
of run directories (every run in it, by name), or a model (Hub id, model folder, .gguf file).
A run serves its baked character under the constitution's name (the run's folder name when two
runs share one), and its base model under the base's own id for comparison:

- transformers engine: base + adapters/persona/ when the run has it, else model/ (the merged
  weights). Every run on the same base shares one loaded copy of it: each character is its
  adapter, the base id is every adapter switched off.
- vLLM engine: one set of weights per process. A single run serves model/ alone when it has it;
  otherwise (and always for several runs) the base with each run's persona LoRA.

A model reference serves that one model. Model ids are dictionary keys only: nothing a client
sends is ever used as a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from character_baker.core.config import ModelsConfig, Recipe
from character_baker.core.errors import UserError
from character_baker.core.runs import MANIFEST, RunDir

Engine = Literal["transformers", "vllm"]
PERSONA_ADAPTER = ("adapters", "persona")
MERGED_MODEL = "model"
LOAD_FIELDS = ("dtype", "device", "trust_remote_code", "chat_template", "attn_implementation")


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
class Character:
    """One choice of the page's picker: the character's own pane, and the prompted base beside it (or None)."""

    pane: Pane
    compare: Pane | None = None


@dataclass(frozen=True)
class ServeTarget:
    """Everything `serve` needs: the served models (characters first), the page's characters, load settings."""

    models: tuple[ServedModel, ...]
    characters: tuple[Character, ...]
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


def runs_in_folder(ref: str) -> list[RunDir]:
    """The run directories directly inside a folder that is neither a run nor a model folder (sorted by name)."""
    folder = Path(ref).expanduser()
    if not folder.is_dir() or (folder / MANIFEST).is_file() or (folder / "config.json").is_file():
        return []
    return [RunDir.open(child) for child in sorted(folder.iterdir()) if (child / MANIFEST).is_file()]


def expand_references(refs: Sequence[str], runs_root: Path = Path("runs")) -> list[RunDir | str]:
    """Each reference as a run, the runs of a folder of runs, or a model reference; duplicates dropped."""
    items: list[RunDir | str] = []
    seen: set[str] = set()
    for ref in refs:
        run = find_run(ref, runs_root)
        for item in [run] if run is not None else (runs_in_folder(ref) or [ref]):
            key = str(item.root.resolve()) if isinstance(item, RunDir) else item
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items


def resolve_target(refs: str | Sequence[str], *, engine: Engine, runs_root: Path = Path("runs")) -> ServeTarget:
    """What to serve for `serve REF...`: each run's baked character (and its base), and each model."""
    items = expand_references([refs] if isinstance(refs, str) else list(refs), runs_root)
    runs = [item for item in items if isinstance(item, RunDir)]
    builder = _TargetBuilder(engine, several_runs=len(runs) > 1)
    names = character_ids(runs)
    for item in items:
        if isinstance(item, RunDir):
            builder.add_run(item, names[item.name])
        else:
            builder.add_model(item)
    return builder.target()


def character_ids(runs: list[RunDir]) -> dict[str, str]:
    """Run name -> served id: the constitution's name, the run's folder name where two runs share one."""
    recorded = {run.name: served_id((run.manifest().get("constitution") or {}).get("name") or run.name)
                for run in runs}
    shared = {name for name in recorded.values() if list(recorded.values()).count(name) > 1}
    ids = {run: served_id(run) if name in shared else name for run, name in recorded.items()}
    if len(set(ids.values())) < len(ids):
        clash = sorted(run for run, name in ids.items() if list(ids.values()).count(name) > 1)
        raise UserError.single(", ".join(clash), "name", "these runs would be served under the same model id",
                               "serve runs whose constitutions or run folders have different names")
    return ids


def _run_recipe(run: RunDir) -> Recipe:
    """The resolved recipe the run was trained with (from its manifest)."""
    try:
        return Recipe.model_validate(run.manifest().get("recipe") or {})
    except ValueError as error:
        raise UserError.single(str(run.manifest_path), "recipe", f"the run's recorded recipe is invalid ({error})",
                               "rerun the run's stages with this version of character-baker") from None


def _baked_model(run: RunDir, base: str, character_id: str, *, prefer_merged: bool) -> ServedModel:
    """The character's weights: base + persona adapter, or the merged model when preferred or alone."""
    adapter = run.path(*PERSONA_ADAPTER)
    merged = run.path(MERGED_MODEL)
    has_adapter = (adapter / "adapter_config.json").is_file()
    has_merged = (merged / "config.json").is_file()
    if not (has_adapter or has_merged):
        raise UserError.single(str(run.root), "model", "this run has no baked model yet: neither model/ nor "
                               "adapters/persona/ exists", "finish the run first: `character-baker train CONSTITUTION`")
    if has_merged and (prefer_merged or not has_adapter):
        return ServedModel(id=character_id, weights=str(merged))
    return ServedModel(id=character_id, weights=base, adapter=adapter)


class _TargetBuilder:
    """Collects served models (characters first, then one entry per base) and the page's characters."""

    def __init__(self, engine: Engine, *, several_runs: bool):
        self.engine, self.several_runs = engine, several_runs
        self.characters: list[ServedModel] = []
        self.bases: dict[str, ServedModel] = {}  # weights reference -> the model serving it plainly
        # (the character's pane or None for a plain model, the base weights beside it, its system prompt)
        self.choices: list[tuple[Pane | None, str | None, str | None]] = []
        self.models_config: ModelsConfig | None = None
        self.notes: list[str] = []

    def add_run(self, run: RunDir, character_id: str) -> None:
        """A run's character, its base (where the engine serves it) and its system prompt for comparison."""
        recipe = _run_recipe(run)
        self._use_models_config(recipe.models, run)
        character = _baked_model(run, recipe.models.base, character_id,
                                 prefer_merged=self.engine == "vllm" and not self.several_runs)
        self.characters.append(character)
        serves_base = character.adapter is not None or self.engine == "transformers"
        if serves_base:
            self.bases.setdefault(recipe.models.base, ServedModel(id="", weights=recipe.models.base))
        title, system_prompt, notes = _constitution_prompt(run, run.manifest().get("constitution") or {},
                                                           recipe.generation.persona_prompt)
        self.notes += notes
        pane = Pane(title=f"{title or character_id} (baked, no system prompt)", model=character_id)
        self.choices.append((pane, recipe.models.base if serves_base else None, system_prompt))

    def add_model(self, ref: str) -> None:
        """A model reference served as it is (its own choice on the page, with no comparison pane)."""
        self.bases.setdefault(ref, ServedModel(id="", weights=ref))
        self.choices.append((None, ref, None))

    def _use_models_config(self, models: ModelsConfig, run: RunDir) -> None:
        if self.models_config is None:
            self.models_config = models
            return
        differing = [name for name in LOAD_FIELDS if getattr(models, name) != getattr(self.models_config, name)]
        if differing:
            self.notes.append(f"{run.root} records other models settings ({', '.join(differing)}) than the first "
                              "run: every model is loaded with the first run's")

    def _base_ids(self) -> dict[str, str]:
        """Weights reference -> served id of each base (suffixed '-base' where a character has that id)."""
        taken = {model.id for model in self.characters}
        ids: dict[str, str] = {}
        for weights in self.bases:
            base_id = reference_id(weights)
            base_id = f"{base_id}-base" if base_id in taken else base_id
            if base_id in ids.values() or base_id in taken:
                raise UserError.single(weights, "model", f"two served models would both be called {base_id!r}",
                                       "serve models whose folder names differ")
            ids[weights] = base_id
        return ids

    def target(self) -> ServeTarget:
        """The collected ServeTarget."""
        base_ids = self._base_ids()
        bases = [ServedModel(id=base_ids[weights], weights=weights) for weights in self.bases]
        characters = []
        for pane, base_weights, system_prompt in self.choices:
            if pane is None:  # a plain model: its pane is the base entry itself
                characters.append(Character(Pane(title=base_ids[base_weights], model=base_ids[base_weights])))
                continue
            compare = None
            if base_weights is not None and system_prompt:
                base_id = base_ids[base_weights]
                compare = Pane(title=f"{base_id} + constitution as system prompt", model=base_id,
                               system_prompt=system_prompt)
            characters.append(Character(pane, compare))
        return ServeTarget(models=tuple(self.characters + bases), characters=tuple(characters),
                           models_config=self.models_config or ModelsConfig(), notes=tuple(self.notes))


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
