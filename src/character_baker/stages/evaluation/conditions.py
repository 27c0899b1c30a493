"""The conditions compared side by side: each is a way of asking a model to answer.

| condition | what answers | included when |
|---|---|---|
| base | the base model, no system prompt | always |
| prompted | the base model with the constitution's system prompt | always |
| steered | the base model with the persona direction added to the residual stream | profile/profile.safetensors exists and the steering hook is installed (below) |
| distilled | base + adapters/distill | adapters/distill/adapter_config.json exists |
| trained | model/ (merged full weights), else base + adapters/persona | either exists |
| NAME | base + the adapter of `--adapter NAME=PATH` | named on the command line |
| NAME | the model of `--model NAME=REF` (folder, .gguf or Hub id) | named on the command line |

Every condition answers through the backend of `generation.student` (hf or vllm for adapters),
with its sampling settings; adapters load into the one shared base model (never a second copy).

Steering hook. The steering code lives in its own issue; it plugs in here through one documented
name, so evaluation never imports another stage. When the module `character_baker.backends.steering`
exists and defines

    def steered_backend(backend: GenerationBackend, profile_dir: Path, cfg: SteerConfig) -> GenerationBackend

returning a backend that generates from `backend`'s model with the persona direction added on
layers cfg.layer_start..cfg.layer_end at cfg.strength, and whose `adapter_fingerprint(None)`
differs from the unsteered backend's (so cached answers never mix), the steered condition is
included whenever the run has a profile. Until then a run with a profile reports the condition
as skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from character_baker.core.errors import UserError
from character_baker.core.stage import StageContext
from character_baker.core.system_prompts import persona_system_prompt

if TYPE_CHECKING:
    from character_baker.backends.generation import Completion, GenerationBackend
    from character_baker.core.config import BackendConfig, SamplingConfig

STEERING_MODULE = "character_baker.backends.steering"
STEERING_FUNCTION = "steered_backend"
PROFILE_FILE = "profile/profile.safetensors"
BUILTIN_NAMES = ("base", "prompted", "steered", "distilled", "trained")
Messages = list[dict[str, str]]


@dataclass
class Condition:
    """One compared condition: a backend, the adapter it switches on, and the system prompt it adds."""

    name: str
    kind: str
    backend: "GenerationBackend"
    adapter: str | None = None
    system_prompt: str | None = None
    model_ref: str = ""
    adapter_path: str | None = None
    tokens_generated: int = field(default=0, compare=False)

    def conversation(self, messages: Messages) -> Messages:
        """`messages` as this condition sees them: its system prompt first, merged with any given one."""
        if not self.system_prompt:
            return list(messages)
        if messages and messages[0]["role"] == "system":
            merged = f"{self.system_prompt}\n\n{messages[0]['content']}"
            return [{"role": "system", "content": merged}] + list(messages[1:])
        return [{"role": "system", "content": self.system_prompt}] + list(messages)

    def answer(self, conversations: Sequence[Messages], sampling: "SamplingConfig",
               label: str | None = None) -> list["Completion"]:
        """One completion per conversation (the condition's system prompt and adapter applied)."""
        if not conversations:
            return []
        rows = self.backend.generate([self.conversation(c) for c in conversations], sampling, n=1,
                                     adapter=self.adapter, progress=f"{self.name}: {label}" if label else None)
        completions = [row[0] for row in rows]
        self.tokens_generated += sum(c.completion_tokens for c in completions)
        return completions

    def prefetch(self, conversations: Sequence[Messages], sampling: "SamplingConfig", label: str) -> list[str]:
        """Answer many conversations in one wide call so the response cache holds them.

        The measures then ask for them in their own small groups and read the cache. On a CPU a
        decode step costs about the same for 4 rows as for 64, so one wide call is several times
        faster than the same answers asked measure by measure. Tokens are counted when a measure
        reads its answers, not here. Only useful with the response cache on (`generation.cache`).
        Returns the answer texts, in order.
        """
        if not conversations:
            return []
        rows = self.backend.generate([self.conversation(c) for c in conversations], sampling, n=1,
                                     adapter=self.adapter, progress=f"{self.name}: {label}")
        return [row[0].text for row in rows]

    def describe(self) -> dict[str, Any]:
        """JSON description for the report."""
        return {"name": self.name, "kind": self.kind, "model": self.model_ref, "adapter": self.adapter_path,
                "system_prompt": bool(self.system_prompt), "backend": self.backend.name}

    def local_model(self) -> tuple[Any, Any] | None:
        """(torch model, tokenizer) when this condition runs in-process through the hf backend, else None."""
        inner = getattr(self.backend, "inner", self.backend)
        if self.kind == "steered" or inner.name != "hf":
            return None
        return inner.model, inner.tokenizer

    @contextlib.contextmanager
    def weights(self) -> Iterator[Any]:
        """The local torch model with this condition's adapter switched on (base weights for none)."""
        local = self.local_model()
        if local is None:
            raise ValueError(f"condition {self.name!r} has no in-process model")
        from character_baker.backends.generation.hf import adapter_enabled

        model = local[0]
        with adapter_enabled(model, self.adapter):
            yield model


@dataclass
class ConditionSet:
    """The conditions to compare, and those skipped with the reason."""

    conditions: list[Condition]
    skipped: dict[str, str]

    def get(self, name: str) -> Condition | None:
        """The condition called `name`, if present."""
        return next((c for c in self.conditions if c.name == name), None)

    @property
    def base(self) -> Condition:
        """The base condition (always present)."""
        return self.conditions[0]


def user_turns(prompts: Sequence[dict]) -> list[Messages]:
    """One single-turn conversation per prompt record."""
    return [[{"role": "user", "content": p["prompt"]}] for p in prompts]


def parse_named_refs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """`NAME=REF` (or bare `REF`, named after its last path part) -> {NAME: REF}; names unique and not built in."""
    named: dict[str, str] = {}
    for value in values or []:
        name, sep, ref = value.partition("=")
        if not sep:
            name, ref = Path(value.rstrip("/")).name, value
        name, ref = name.strip(), ref.strip()
        if not name or not ref:
            raise UserError.single(flag, value, "expected NAME=PATH", f"write e.g. {flag} mine=path/to/folder")
        if name in BUILTIN_NAMES or name in named:
            raise UserError.single(flag, name, f"the condition name '{name}' is already taken",
                                   f"choose a name other than {', '.join(BUILTIN_NAMES)} and each other")
        named[name] = ref
    return named


def check_adapter_folder(path: str | Path, flag: str) -> Path:
    """A PEFT adapter folder (holding adapter_config.json), or a UserError naming the fix."""
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise UserError.single(str(path), flag, "not a PEFT adapter folder (no adapter_config.json)",
                               "pass the folder a training stage wrote, e.g. runs/NAME/adapters/distill")
    return folder


def steering_hook() -> Callable[..., "GenerationBackend"] | None:
    """The installed `steered_backend` function (see the module docstring), or None."""
    try:
        module = importlib.import_module(STEERING_MODULE)
    except ModuleNotFoundError as error:
        if error.name != STEERING_MODULE:
            raise
        return None
    return getattr(module, STEERING_FUNCTION, None)


def _adapter_name(name: str) -> str:
    """A PEFT-safe adapter name (no dots: PEFT keys modules by it)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


class ConditionBuilder:
    """Builds the conditions of one run: one shared base backend, adapters loaded into it."""

    def __init__(self, ctx: StageContext):
        from character_baker.backends.generation import make_backend

        self.ctx = ctx
        self.role: "BackendConfig" = ctx.recipe.generation.student
        self.cache_dir = ctx.run.path("cache") if ctx.recipe.generation.cache else None
        self._make = make_backend
        self.base_backend = self._backend(None)

    def _backend(self, model: str | None) -> "GenerationBackend":
        role = self.role.model_copy(update={"model": model}) if model else self.role
        return self._make(role, self.ctx.recipe.models, cache_dir=self.cache_dir, shared=self.ctx.shared)

    def _with_adapter(self, name: str, kind: str, path: Path) -> Condition:
        inner = getattr(self.base_backend, "inner", self.base_backend)
        if not hasattr(inner, "load_adapter"):
            raise UserError.single("recipe", "generation.student.backend",
                                   f"the {inner.name} backend cannot load adapters (needed for '{name}')",
                                   "use the hf or vllm backend for generation.student")
        adapter = _adapter_name(name)
        self.base_backend.load_adapter(str(path), adapter)
        return Condition(name, kind, self.base_backend, adapter=adapter, model_ref=self.ctx.recipe.models.base,
                         adapter_path=str(path))

    def _steered(self, skipped: dict[str, str]) -> Condition | None:
        if not self.ctx.run.path(PROFILE_FILE).is_file():
            return None
        hook = steering_hook()
        if hook is None:
            skipped["steered"] = f"a profile exists but {STEERING_MODULE}.{STEERING_FUNCTION} is not installed"
            return None
        from character_baker.backends.generation import CachedBackend

        inner = getattr(self.base_backend, "inner", self.base_backend)
        backend = hook(inner, self.ctx.run.path("profile"), self.ctx.recipe.steer)
        if self.cache_dir is not None:
            backend = CachedBackend(backend, self.cache_dir)
        return Condition("steered", "steered", backend, model_ref=self.ctx.recipe.models.base)

    def _trained(self) -> Condition | None:
        merged = self.ctx.run.path("model")
        if (merged / "config.json").is_file():
            return Condition("trained", "trained", self._backend(str(merged)), model_ref=str(merged))
        persona = self.ctx.run.path("adapters", "persona")
        if (persona / "adapter_config.json").is_file():
            return self._with_adapter("trained", "trained", persona)
        return None

    def build(self, extra_adapters: dict[str, str], extra_models: dict[str, str]) -> ConditionSet:
        """Every condition this run has, in report order, and the skipped ones with reasons."""
        base_ref = self.ctx.recipe.models.base
        skipped: dict[str, str] = {}
        conditions = [Condition("base", "base", self.base_backend, model_ref=base_ref),
                      Condition("prompted", "prompted", self.base_backend, model_ref=base_ref,
                                system_prompt=persona_system_prompt(self.ctx.constitution,
                                                                            self.ctx.recipe.generation.persona_prompt))]
        distill = self.ctx.run.path("adapters", "distill")
        optional = [self._steered(skipped),
                    self._with_adapter("distilled", "distilled", distill)
                    if (distill / "adapter_config.json").is_file() else None,
                    self._trained()]
        for name, reason in (("distilled", "no adapters/distill"), ("trained", "no model/ nor adapters/persona")):
            if not any(c is not None and c.name == name for c in optional):
                skipped[name] = reason
        wanted = set(self.ctx.recipe.eval.conditions)
        for condition in optional:
            if condition is not None and condition.name not in wanted:
                skipped[condition.name] = "not in eval.conditions"
        conditions = [c for c in conditions if c.name in wanted | {"base"}]
        conditions += [c for c in optional if c is not None and c.name in wanted]
        conditions += [self._with_adapter(name, "adapter", check_adapter_folder(path, "--adapter"))
                       for name, path in extra_adapters.items()]
        conditions += [Condition(name, "model", self._backend(ref), model_ref=ref)
                       for name, ref in extra_models.items()]
        return ConditionSet(conditions, skipped)
