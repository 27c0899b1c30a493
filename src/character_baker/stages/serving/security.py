"""Request guards of the transformers server, as ASGI middleware (outermost first).

- `LoopbackHostGuard` (when bound to a loopback address): only requests whose Host header names
  a loopback address are served, so a web page on another domain cannot reach the server
  through DNS rebinding.
- `ApiKeyGuard` (with --api-key / CHARACTER_BAKER_API_KEY): every route needs
  `Authorization: Bearer KEY` (API clients) or HTTP Basic auth with KEY as the password
  (browsers: the chat page at / asks once, then the browser sends it with every request).
- `BodySizeLimit` (--max-body-bytes): a body over the limit gets 413, from its Content-Length
  before anything is read, or by counting while reading when there is none (chunked uploads).

Every refusal is a JSON body in OpenAI's error shape.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from character_baker.stages.serving.schemas import error_body

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
GUARDED_SCOPES = ("http", "websocket")


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (lower-case name), or None."""
    return next((value for key, value in scope.get("headers", []) if key == name), None)


async def send_error(send: Send, status: int, message: str, *, code: str,
                     headers: dict[str, str] | None = None) -> None:
    """Answer with an OpenAI-shaped JSON error, without calling the app."""
    import json

    payload = json.dumps(error_body(message, error_type="invalid_request_error", code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def is_loopback_host(host: str) -> bool:
    """True for 'localhost' and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(value: bytes | None) -> str | None:
    """The host part of a Host header ('[::1]:8000' -> '::1'), or None when it does not parse."""
    if not value:
        return None
    try:
        return urlsplit("//" + value.decode("latin-1")).hostname
    except ValueError:
        return None


class LoopbackHostGuard:
    """Serve only requests addressed to a loopback host name (a DNS-rebinding guard)."""

    def __init__(self, app: ASGIApp, port: int):
        self.app, self.port = app, port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = _host_name(header(scope, b"host"))
        if scope["type"] not in GUARDED_SCOPES or (host is not None and is_loopback_host(host)):
            await self.app(scope, receive, send)
            return
        await send_error(send, 400, f"host {str(host)[:100]!r} is not served: this server listens on loopback only; "
                         f"open http://127.0.0.1:{self.port}/", code="invalid_host")


class ApiKeyGuard:
    """Require the API key (Bearer, or Basic auth password) on every route."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in GUARDED_SCOPES or self.authorised(header(scope, b"authorization")):
            await self.app(scope, receive, send)
            return
        # The page gets a Basic challenge so a browser asks for the key; API routes a Bearer one.
        challenge = "Basic" if scope.get("path") == "/" else "Bearer"
        await send_error(send, 401, "missing or wrong API key: send `Authorization: Bearer KEY` with the key given "
                         "to `serve --api-key` (or CHARACTER_BAKER_API_KEY)", code="invalid_api_key",
                         headers={"WWW-Authenticate": f'{challenge} realm="character-baker", charset="UTF-8"'})

    def authorised(self, authorization: bytes | None) -> bool:
        """Whether an Authorization header carries the key (constant-time comparison)."""
        scheme, _, value = (authorization or b"").partition(b" ")
        if scheme.lower() == b"bearer":
            candidate = value.strip()
        elif scheme.lower() == b"basic":
            try:
                candidate = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except binascii.Error:
                return False
        else:
            return False
        return hmac.compare_digest(candidate, self.key)


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413; hand the app the body it has read."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None and not declared.strip().isdigit():
            await send_error(send, 400, "invalid Content-Length header", code="invalid_content_length")
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        body = await self._read(receive)
        if body is None:
            await self._too_large(send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (or the client leaves)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        await send_error(send, 413, f"request body is larger than this server's limit of {self.max_bytes} bytes "
                         "(raise it with `serve --max-body-bytes`)", code="request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that yields the already-read body once, then defers to the real one."""
    delivered = False

    async def replayed() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
