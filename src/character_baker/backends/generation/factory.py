"""Build the generation backend a role's config asks for.

    shared = {}
    teacher = make_backend(recipe.generation.teacher, recipe.models, cache_dir=cache, shared=shared)
    student = make_backend(recipe.generation.student, recipe.models, cache_dir=cache, shared=shared)

Local backends (hf, vllm) are shared per model reference through `shared`: teacher and student
on the same base load the weights once and use one backend (one adapter set); the batch size
is the first role's. HTTP backends are light and built per role.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from character_baker.backends.generation.base import GenerationBackend
from character_baker.backends.generation.cache import CachedBackend
from character_baker.core.config import BackendConfig, ModelsConfig
from character_baker.core.errors import UserError

Builder = Callable[[BackendConfig, ModelsConfig], GenerationBackend]


def _hf(role: BackendConfig, models: ModelsConfig) -> GenerationBackend:
    from character_baker.backends.generation.hf import HFBackend
    from character_baker.backends.models import load_model

    ref = role.model or models.base
    model, tokenizer = load_model(ref, models)
    return HFBackend(model, tokenizer, batch_size=role.batch_size, model_id=str(ref))


def _vllm(role: BackendConfig, models: ModelsConfig) -> GenerationBackend:
    from character_baker.backends.generation.vllm_backend import VLLMBackend
    from character_baker.backends.models import resolve_model

    ref = role.model or models.base
    folder = resolve_model(ref, trust_remote_code=models.trust_remote_code)
    return VLLMBackend(str(folder), model_id=str(ref), dtype=models.dtype, trust_remote_code=models.trust_remote_code)


def _openai(role: BackendConfig, models: ModelsConfig) -> GenerationBackend:
    from character_baker.backends.generation.openai_backend import OpenAIBackend

    return OpenAIBackend(role.model or models.base, base_url=role.base_url, api_key_env=role.api_key_env,
                         max_concurrency=role.max_concurrency, max_retries=role.max_retries, timeout_s=role.timeout_s)


def _anthropic(role: BackendConfig, models: ModelsConfig) -> GenerationBackend:
    from character_baker.backends.generation.anthropic_backend import AnthropicBackend

    if not role.model:
        raise UserError.single("recipe", "generation.<role>.model", "the anthropic backend needs a model name",
                               fix="set model: to an Anthropic model id for this role")
    return AnthropicBackend(role.model, base_url=role.base_url, api_key_env=role.api_key_env,
                            max_concurrency=role.max_concurrency, max_retries=role.max_retries,
                            timeout_s=role.timeout_s)


BUILDERS: dict[str, Builder] = {"hf": _hf, "vllm": _vllm, "openai": _openai, "anthropic": _anthropic}
LOCAL_BACKENDS = ("hf", "vllm")


def make_backend(role: BackendConfig, models: ModelsConfig, *, cache_dir: Path | None,
                 shared: dict | None = None) -> GenerationBackend:
    """The backend for one role: local models shared through `shared`; cached on disk when cache_dir is set."""
    shared = shared if shared is not None else {}
    if role.backend in LOCAL_BACKENDS:
        key = (role.backend, str(role.model or models.base))
        if key not in shared:
            shared[key] = BUILDERS[role.backend](role, models)
        backend = shared[key]
    else:
        backend = BUILDERS[role.backend](role, models)
    if cache_dir is None:
        return backend
    return CachedBackend(backend, cache_dir)

