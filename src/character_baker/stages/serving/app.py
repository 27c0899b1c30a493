"""The OpenAI-compatible server on transformers: a FastAPI app factory and the uvicorn runner.

    GET  /                      the chat page (a character picker; the character vs its prompted base)
    GET  /page/config           the page's characters, default max_tokens and temperature
    GET  /health                {"status": "ok", "models": [...], "queue": {...}, "bases": [...]}
    GET  /v1/models             the served model ids (characters first)
    GET  /v1/models/{id}        one of them (404 otherwise)
    POST /v1/chat/completions   with or without "stream": true (server-sent events)

Guards (see security.py): loopback Host only when bound to loopback, the API key on every
route when set, a body-size limit; limits on max_tokens (bridge.py). Requests decode in batches
(bridge.py); one that waits longer than `queue_timeout` for a row gets 503 with Retry-After.
Response headers (and the first stream chunk) are sent once the request has its row, so a
refusal is always a status code. A client that disconnects, streaming or not, cancels its
request. No OpenAPI or docs routes are served.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from character_baker.stages.serving.bridge import Generation, GenerationBridge, PreparedChat
from character_baker.stages.serving.schemas import (ApiError, chunk_body, completion_body, error_body, model_body,
                                                    new_completion_id, parse_chat_request, usage_body)
from character_baker.stages.serving.security import ApiKeyGuard, BodySizeLimit, LoopbackHostGuard, is_loopback_host
from character_baker.stages.serving.target import Pane, ServeTarget

PAGE_MAX_TOKENS = 512
PAGE_TEMPERATURE = 0.7
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left first"; nobody reads it
T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """Where the server listens and the limits it enforces (the `serve` flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_tokens: int = 1024
    max_concurrency: int = 256  # KV-cache rows are allocated as requests use them, not up front
    max_queue: int = 1024
    queue_timeout: float = 300.0
    max_body_bytes: int = 1_000_000


def page_html() -> str:
    """The chat page shipped next to this module."""
    return resources.files("character_baker.stages.serving").joinpath("page.html").read_text(encoding="utf-8")


def content_security_policy(html: str) -> str:
    """A CSP that allows only this page's own inline script and style (by hash) and same-origin fetches."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page_config(target: ServeTarget, settings: ServeSettings) -> dict[str, Any]:
    """What the page needs: its characters (each one's pane and comparison pane) and default sampling."""
    def pane(pane: Pane | None) -> dict[str, Any] | None:
        return None if pane is None else {"title": pane.title, "model": pane.model, "system_prompt": pane.system_prompt}

    return {"characters": [{"pane": pane(character.pane), "compare": pane(character.compare)}
                           for character in target.characters],
            "max_tokens": min(settings.max_tokens, PAGE_MAX_TOKENS), "temperature": PAGE_TEMPERATURE}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream_chunks(generation: Generation, prepared: PreparedChat, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks, a finish chunk, [usage], then [DONE]."""
    completion_id = new_completion_id()
    yield _sse(chunk_body(completion_id, prepared.model_id, {"role": "assistant", "content": ""}))
    async for event in generation.events():
        if event.error:
            yield _sse(error_body(event.error, error_type="server_error", code="generation_failed"))
            return
        if event.text:
            yield _sse(chunk_body(completion_id, prepared.model_id, {"content": event.text}))
        if event.finish_reason:
            yield _sse(chunk_body(completion_id, prepared.model_id, {}, finish_reason=event.finish_reason))
            if include_usage:
                usage = usage_body(len(prepared.prompt_ids), event.completion_tokens)
                yield _sse(chunk_body(completion_id, prepared.model_id, {}, usage=usage))
    yield "data: [DONE]\n\n"


async def complete(generation: Generation, prepared: PreparedChat) -> dict[str, Any]:
    """A whole `chat.completion` body from a generation's events."""
    parts, finish_reason, completion_tokens = [], "stop", 0
    async for event in generation.events():
        if event.error:
            raise ApiError(500, event.error, code="generation_failed")
        parts.append(event.text)
        if event.finish_reason:
            finish_reason, completion_tokens = event.finish_reason, event.completion_tokens
    return completion_body(new_completion_id(), prepared.model_id, "".join(parts), finish_reason,
                           len(prepared.prompt_ids), completion_tokens)


def create_app(bridge: GenerationBridge, target: ServeTarget, settings: ServeSettings) -> FastAPI:
    """The FastAPI app: routes, OpenAI-shaped errors, and the guards for `settings`."""
    app = FastAPI(title="character-baker", docs_url=None, redoc_url=None, openapi_url=None)
    _add_routes(app, bridge, target, settings)
    _add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    if is_loopback_host(settings.host):
        app.add_middleware(LoopbackHostGuard, port=settings.port)  # added last = runs first
    return app


def _add_routes(app: FastAPI, bridge: GenerationBridge, target: ServeTarget, settings: ServeSettings) -> None:
    created = int(time.time())
    html = page_html()
    page_headers = {"Content-Security-Policy": content_security_policy(html), "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=page_headers)

    @app.get("/page/config")
    async def config() -> dict[str, Any]:
        return page_config(target, settings)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return bridge.health()

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_body(model_id, created) for model_id in bridge.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if model_id not in bridge.model_ids():
            raise ApiError(404, f"The model '{model_id[:100]}' does not exist", code="model_not_found", param="model")
        return model_body(model_id, created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, f"send the body as JSON with Content-Type: application/json (got {content_type!r})",
                           code="unsupported_media_type")
        chat = parse_chat_request(await request.body())
        prepared = bridge.prepare(chat)
        generation = bridge.start(prepared, stream=chat.stream)
        started = await until_done_or_gone(request, generation.wait_started(settings.queue_timeout), generation)
        if started is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if not started:
            raise ApiError(503, f"no decoding row came free within {settings.queue_timeout:g} s "
                           "(serve --queue-timeout); retry later", code="queue_timeout",
                           headers={"Retry-After": str(max(1, math.ceil(settings.queue_timeout / 2)))})
        if not chat.stream:
            body = await until_done_or_gone(request, complete(generation, prepared), generation)
            return JSONResponse(body) if body is not None else Response(status_code=CLIENT_CLOSED_REQUEST)
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return StreamingResponse(stream_chunks(generation, prepared, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_done_or_gone(request: Request, work: Awaitable[T], generation: Generation) -> T | None:
    """The result of `work`, or None with the generation cancelled if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    generation.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else "http_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {error.detail}",
                                       error_type="invalid_request_error", code=code),
                            status_code=error.status_code, headers=getattr(error, "headers", None))


def run_server(target: ServeTarget, settings: ServeSettings) -> None:
    """Load the target's weights and serve them with uvicorn until interrupted."""
    import uvicorn

    bridge = GenerationBridge.load(target, max_concurrency=settings.max_concurrency, max_queue=settings.max_queue,
                                   max_tokens=settings.max_tokens)
    app = create_app(bridge, target, settings)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", server_header=False,
                    timeout_graceful_shutdown=5)
    finally:
        bridge.close()
