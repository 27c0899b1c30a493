"""Serving a baked character: `character-baker serve RUN|MODEL`.

    target      what to serve: a run's character (+ its base for comparison) or one model
    vllm        the `vllm serve` command line (merged model, or base + persona LoRA), exec'd
    app         our OpenAI-compatible FastAPI server on transformers, and the chat page at /
    bridge      served ids -> loaded weights; limits; streaming generation in a worker thread
    schemas     the chat-completions wire format and OpenAI-shaped errors
    security    ASGI guards: loopback Host, API key, body size
    page.html   the two-pane chat page (plain HTML + JS, no external assets)

Features, the flag that controls each, and its cost:

- Engine (`--engine auto|vllm|transformers`): auto = vLLM when installed (continuous batching,
  the fast path on a GPU), else transformers (one generation per set of weights at a time).
- Bind address (`--host`, default 127.0.0.1): loopback only unless told otherwise; while on
  loopback, requests must also name a loopback Host (DNS-rebinding guard).
- API key (`--api-key` or CHARACTER_BAKER_API_KEY): required on every route when set.
- Limits (`--max-tokens`, `--max-concurrency`, `--max-body-bytes`): 400 above the max_tokens
  limit, 429 when every generation slot is busy, 413 for a body over the limit.
- Nothing from a request reaches a shell or a file path: model ids are dictionary keys.

Heavy imports (torch, transformers, fastapi) happen inside the modules that need them.
"""

from __future__ import annotations

from character_baker.stages.serving.target import Pane, ServedModel, ServeTarget, resolve_target

__all__ = ["Pane", "ServeTarget", "ServedModel", "resolve_target"]
