"""Serving baked characters: `character-baker serve RUN... | FOLDER | MODEL`.

    target      what to serve: each run's character (+ its base for comparison), folders of runs, models
    vllm        the `vllm serve` command line (merged model, or one base + every run's LoRA), exec'd
    app         our OpenAI-compatible FastAPI server on transformers, and the chat page at /
    bridge      served ids -> loaded bases and their batching engines; limits; streaming to the event loop
    schemas     the chat-completions wire format and OpenAI-shaped errors
    security    ASGI guards: loopback Host, API key, body size
    page.html   the chat page: a character picker, the character vs its prompted base (plain HTML + JS)

Features, the flag that controls each, and its cost:

- Engine (`--engine auto|vllm|transformers`): auto = vLLM when installed (its own continuous
  batching, the fast path on a GPU), else transformers (our continuous-batching engine,
  backends/generation/engine.py).
- Many characters (`serve RUN RUN ...` or a folder of runs): each run under its character's name;
  one loaded copy of each distinct base, every run's adapter on it, chosen per request (a batch
  mixes them). vLLM: one base per process, every run as `--lora-modules NAME=PATH`.
- Batching and the queue (`--max-concurrency`, `--max-queue`, `--queue-timeout`): per base,
  max-concurrency requests decode together (KV cache memory grows with it); up to max-queue
  more wait; beyond that 429 with Retry-After; a request waiting longer than queue-timeout gets
  503 with Retry-After. A client that disconnects frees its row at the next decode step.
- Bind address (`--host`, default 127.0.0.1): loopback only unless told otherwise; while on
  loopback, requests must also name a loopback Host (DNS-rebinding guard).
- API key (`--api-key` or CHARACTER_BAKER_API_KEY): required on every route when set (401).
- Limits (`--max-tokens`, `--max-body-bytes`): 400 above the max_tokens limit, 413 for a body
  over the limit (nothing past it is read); malformed JSON 400, unknown model 404; every
  refusal in OpenAI's error shape.
- Nothing from a request reaches a shell or a file path: model ids are dictionary keys.

Heavy imports (torch, transformers, fastapi) happen inside the modules that need them.
"""

from __future__ import annotations

from character_baker.stages.serving.target import Character, Pane, ServedModel, ServeTarget, resolve_target

__all__ = ["Character", "Pane", "ServeTarget", "ServedModel", "resolve_target"]
