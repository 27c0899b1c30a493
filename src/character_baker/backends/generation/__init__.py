"""Generation backends behind one interface: `backend.generate(conversations, sampling, n)`.

    hf          in-process transformers model (static KV cache + CUDA graphs on GPU), PEFT adapters
    vllm        in-process vLLM engine, LoRA per request (pip install 'character-baker[vllm]')
    openai      any OpenAI-compatible endpoint through the official SDK
    anthropic   Anthropic's Messages API through the official SDK
    cache       CachedBackend: on-disk response cache, so reruns cost nothing
    progress    a rich bar on a terminal, plain periodic lines otherwise
    factory     make_backend(role, models, cache_dir=..., shared=...)

Backend modules import their heavy dependencies (torch, SDKs, vllm) only when used.
"""

from character_baker.backends.generation.base import Completion, GenerationBackend
from character_baker.backends.generation.cache import CachedBackend, ResponseCache, response_key
from character_baker.backends.generation.factory import make_backend
from character_baker.backends.generation.progress import ProgressReporter

__all__ = ["CachedBackend", "Completion", "GenerationBackend", "ProgressReporter", "ResponseCache",
           "make_backend", "response_key"]

_LAZY = {"HFBackend": "hf", "VLLMBackend": "vllm_backend", "OpenAIBackend": "openai_backend",
         "AnthropicBackend": "anthropic_backend"}
__all__ += list(_LAZY)


def __getattr__(name: str):
    """Backend classes load on first access, so importing this package stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
