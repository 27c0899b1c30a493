"""`character-baker serve RUN` on transformers, driven with the official openai client and raw HTTP.

One server runs for the module: the real CLI in a subprocess on 127.0.0.1:<free port>, serving a
run directory whose persona adapter (non-zero LoRA weights) sits on a tiny Llama, with the API key
taken from CHARACTER_BAKER_API_KEY. The in-process tests build the app directly, to hold the
engine busy (a token callback that blocks) and fill its queue, or to watch a request get cancelled.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve_kit import app_in_thread, cli_server, make_run

KEY = "sk-serve-test"
MAX_TOKENS = 24
MAX_BODY = 4096
HELLO = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """The CLI serving the run on a free loopback port; yields its base URL."""
    root = tmp_path_factory.mktemp("serve-api")
    run = make_run(root / "runs", tiny_model_dir)
    with cli_server([str(run), "--max-tokens", str(MAX_TOKENS), "--max-concurrency", "2",
                     "--max-body-bytes", str(MAX_BODY)], root, KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    """The official openai client pointed at the server, with the right key and no retries."""
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def post_chat(server: str, content: bytes, content_type: str = "application/json", **headers: str) -> httpx.Response:
    """POST raw bytes to /v1/chat/completions with the key."""
    return httpx.post(f"{server}/v1/chat/completions", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type, **headers})


def test_models_lists_the_character_first_then_its_base(client, tiny_model_dir):
    ids = [model.id for model in client.models.list()]
    assert ids == ["pirate", Path(tiny_model_dir).name]
    assert client.models.retrieve("pirate").id == "pirate"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody")


def test_chat_completion_applies_the_adapter_and_is_deterministic_when_greedy(client, tiny_model_dir):
    ask = dict(messages=HELLO, max_tokens=MAX_TOKENS, temperature=0)
    character = client.chat.completions.create(model="pirate", **ask)
    again = client.chat.completions.create(model="pirate", **ask)
    base = client.chat.completions.create(model=Path(tiny_model_dir).name, **ask)
    choice = character.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert character.model == "pirate" and character.id.startswith("chatcmpl-")
    assert 1 <= character.usage.completion_tokens <= MAX_TOKENS and character.usage.prompt_tokens > 0
    assert again.choices[0].message.content == choice.message.content
    assert base.choices[0].message.content != choice.message.content  # adapter on vs every adapter off


def test_streaming_sends_the_same_text_as_one_response_and_reports_usage(client):
    ask = dict(model="pirate", messages=HELLO, max_tokens=MAX_TOKENS, temperature=0)
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({chunk.id for chunk in chunks}) == 1


def test_sampling_with_a_seed_repeats(client):
    ask = dict(model="pirate", messages=HELLO, max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=7)
    first = client.chat.completions.create(**ask).choices[0].message.content
    assert client.chat.completions.create(**ask).choices[0].message.content == first


ROUTES = [("GET", "/"), ("GET", "/health"), ("GET", "/page/config"), ("GET", "/v1/models"),
          ("GET", "/v1/models/pirate"), ("POST", "/v1/chat/completions"), ("GET", "/no/such/route")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_the_api_key_is_required_on_every_route(server, method, path):
    def status(authorization: str | None) -> httpx.Response:
        headers = {"Authorization": authorization} if authorization else {}
        return httpx.request(method, f"{server}{path}", headers=headers, timeout=30,
                             json={"model": "pirate", "messages": HELLO, "max_tokens": 2} if method == "POST" else None)

    for wrong in (None, "Bearer not-the-key", f"Bearer {KEY}x", "Basic " + base64.b64encode(b"user:nope").decode()):
        response = status(wrong)
        assert response.status_code == 401, (wrong, response.text)
        assert "API key" in response.json()["error"]["message"]
    basic = status("Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode())
    assert basic.status_code != 401


def test_a_wrong_key_is_an_authentication_error_for_the_client_and_the_page_asks_a_browser(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server}/").headers["WWW-Authenticate"].startswith("Basic")


BAD_BODIES = [
    (b"{not json", 400, "JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model: Field required"),
    (b'{"model": "pirate", "messages": []}', 400, "messages"),
    (b'{"model": "pirate", "messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages.0.role"),
    (b'{"model": "pirate", "messages": [{"role": "user"}]}', 400, "messages.0.content"),
    (b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}', 400, "temperature"),
    (b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}', 400,
     "stop: unsupported field"),
    (b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n:"),
    (b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 25}', 400,
     "above this server's limit of 24"),
    (b'{"model": "../../etc/passwd", "messages": [{"role": "user", "content": "hi"}]}', 404,
     "'../../etc/passwd' does not exist"),
    (b'{"model": "/etc/passwd", "messages": [{"role": "user", "content": "hi"}]}', 404, "does not exist"),
]


@pytest.mark.parametrize("body,status,message", BAD_BODIES)
def test_bad_bodies_get_a_clear_4xx(server, body, status, message):
    response = post_chat(server, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_the_client_sees_the_limits_as_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="limit of 24"):
        client.chat.completions.create(model="pirate", messages=HELLO, max_tokens=MAX_TOKENS + 1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="../../etc/passwd", messages=HELLO)


def test_bodies_over_the_limit_get_413_with_or_without_a_content_length(server):
    big = b'{"model": "pirate", "messages": [{"role": "user", "content": "' + b"a" * MAX_BODY + b'"}]}'
    declared = post_chat(server, big)
    assert declared.status_code == 413 and "limit of 4096 bytes" in declared.json()["error"]["message"]
    chunked = httpx.post(f"{server}/v1/chat/completions", content=iter([big[:3000], big[3000:]]), timeout=30,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert chunked.status_code == 413


def test_non_json_content_type_and_foreign_host_are_refused(server):
    assert post_chat(server, b"model=pirate", content_type="application/x-www-form-urlencoded").status_code == 415
    rebound = httpx.get(f"{server}/health", headers={"Authorization": f"Bearer {KEY}", "Host": "evil.example"})
    assert rebound.status_code == 400 and "loopback" in rebound.json()["error"]["message"]


def test_the_page_and_its_config_name_the_character_and_its_compare_pane(server, tiny_model_dir):
    auth = {"Authorization": f"Bearer {KEY}"}
    page = httpx.get(f"{server}/", headers=auth)
    assert page.status_code == 200 and 'id="panes"' in page.text and 'id="character"' in page.text
    assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]
    [character] = httpx.get(f"{server}/page/config", headers=auth).json()["characters"]
    assert character["pane"]["model"] == "pirate" and character["pane"]["system_prompt"] is None
    assert character["compare"]["model"] == Path(tiny_model_dir).name
    assert "Captain Rook" in character["compare"]["system_prompt"]


def test_a_five_megabyte_body_gets_413_through_the_official_client(client):
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "a" * 5_000_000}])
    assert refused.value.status_code == 413
    assert refused.value.body["code"] == "request_too_large" and "limit of 4096 bytes" in refused.value.message


# ----------------------------------------------------------------------------- in-process
def tiny_target(tiny_model_dir):
    from character_baker.core.config import ModelsConfig
    from character_baker.stages.serving.target import Character, Pane, ServedModel, ServeTarget

    return ServeTarget(models=(ServedModel("tiny", str(tiny_model_dir)),), characters=(Character(Pane("tiny", "tiny")),),
                       models_config=ModelsConfig(device="cpu"))


@contextmanager
def tiny_app(tiny_model_dir, **limits):
    """(bridge, app) serving the tiny model with no API key and the given ServeSettings limits."""
    from character_baker.stages.serving.app import ServeSettings, create_app
    from character_baker.stages.serving.bridge import GenerationBridge

    settings = ServeSettings(**{"max_tokens": 8, **limits})
    target = tiny_target(tiny_model_dir)
    bridge = GenerationBridge.load(target, max_concurrency=settings.max_concurrency, max_queue=settings.max_queue,
                                   max_tokens=settings.max_tokens)
    try:
        yield bridge, create_app(bridge, target, settings)
    finally:
        bridge.close()


@contextmanager
def engine_held(bridge, queued: int = 0):
    """Hold the bridge's engine busy (one row whose token callback blocks) with `queued` more requests waiting."""
    from character_baker.backends.generation.base import encode_prompt
    from character_baker.backends.generation.engine import EngineRequest

    loaded = next(iter(bridge.weights.values()))
    prompt = encode_prompt(loaded.tokenizer, HELLO)
    blocked, release = threading.Event(), threading.Event()

    def hold(token_id: int) -> None:
        blocked.set()
        release.wait(120)

    holder = loaded.engine.submit(EngineRequest(prompt, max_new_tokens=2, on_token=hold))
    assert blocked.wait(120), "the engine never started the holding request"
    waiting = [loaded.engine.submit(EngineRequest(prompt, max_new_tokens=2)) for _ in range(queued)]
    try:
        yield
    finally:
        release.set()
        for handle in [holder, *waiting]:
            handle.wait(120)


def test_health_reports_the_queue_and_the_loaded_models(tiny_model_dir):
    from fastapi.testclient import TestClient

    with tiny_app(tiny_model_dir, max_concurrency=3, max_queue=5) as (bridge, app), \
            TestClient(app, base_url="http://127.0.0.1") as test_client:
        health = test_client.get("/health").json()
        assert health["status"] == "ok" and health["models"] == ["tiny"]
        assert health["queue"] == {"running": 0, "waiting": 0}
        assert health["bases"] == [{"base": Path(tiny_model_dir).name, "models": ["tiny"], "running": 0,
                                    "waiting": 0, "max_concurrency": 3, "max_queue": 5}]
        with engine_held(bridge, queued=2):
            assert test_client.get("/health").json()["queue"] == {"running": 1, "waiting": 2}


def test_a_full_queue_gets_429_with_retry_after_and_a_freed_row_serves_again(tiny_model_dir):
    from fastapi.testclient import TestClient

    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4}
    with tiny_app(tiny_model_dir, max_concurrency=1, max_queue=1) as (bridge, app), \
            TestClient(app, base_url="http://127.0.0.1") as test_client:
        with engine_held(bridge, queued=1):
            busy = test_client.post("/v1/chat/completions", json=body)
            assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
            error = busy.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "invalid_request_error"
            assert "--max-queue" in error["message"]
        answered = test_client.post("/v1/chat/completions", json=body)
        assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_request_that_waits_past_the_queue_timeout_gets_503_and_leaves_the_queue(tiny_model_dir):
    from fastapi.testclient import TestClient

    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4}
    with tiny_app(tiny_model_dir, max_concurrency=1, max_queue=4, queue_timeout=0.2) as (bridge, app), \
            TestClient(app, base_url="http://127.0.0.1") as test_client:
        with engine_held(bridge):
            late = test_client.post("/v1/chat/completions", json={**body, "stream": True})
            assert late.status_code == 503 and late.headers["Retry-After"] == "1"
            assert late.json()["error"]["code"] == "queue_timeout" and "--queue-timeout" in late.text
            assert bridge.health()["queue"]["waiting"] == 0


def poll(condition, what: str, deadline_s: float = 120.0) -> None:
    """Wait until `condition()` holds (a deadline only against hangs; nothing is timed)."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(tiny_model_dir, monkeypatch, stream):
    from character_baker.stages.serving.bridge import Generation

    finished = []
    on_finish = Generation._on_finish
    monkeypatch.setattr(Generation, "_on_finish", lambda self, result: (finished.append(result), on_finish(self, result)))
    with tiny_app(tiny_model_dir, max_concurrency=1, max_tokens=1500) as (bridge, app), app_in_thread(app) as url:
        loaded = next(iter(bridge.weights.values()))
        loaded.stop_ids = ()  # nothing ends this answer before 1500 tokens but the client leaving
        body = json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 1500, "stream": stream}).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            if stream:
                assert connection.recv(4096).startswith(b"HTTP/1.1 200")
            else:
                poll(lambda: loaded.engine.stats().running == 1, "the request to start decoding")
        poll(lambda: finished, "the request to finish")
        assert finished[0].finish_reason == "cancelled" and len(finished[0].token_ids) < 1500
        assert loaded.engine.stats().running == 0


def test_the_body_limit_reads_nothing_past_the_limit():
    import asyncio

    from character_baker.stages.serving.security import BodySizeLimit

    async def app(scope, receive, send):
        raise AssertionError("an oversize body must not reach the app")

    def run(headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, int]:
        """(status sent, body chunks read) for a request of `chunks` chunks of 1000 bytes."""
        read, sent = [], []

        async def receive():
            read.append(1)
            return {"type": "http.request", "body": b"x" * 1000, "more_body": len(read) < chunks}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "headers": headers}
        asyncio.run(BodySizeLimit(app, max_bytes=2500)(scope, receive, send))
        return sent[0]["status"], len(read)

    assert run([(b"content-length", b"5000000")], 5000) == (413, 0)
    assert run([], 5000) == (413, 3)  # chunked: stops at the chunk that passes 2500 bytes


def test_incremental_decoding_matches_decoding_everything_at_once(tiny_tok):
    from character_baker.stages.serving.bridge import IncrementalDecoder

    ids = tiny_tok("Ahoy, h\u00e9llo \u4e16\u754c!\nnext line \u2603 end", add_special_tokens=False)["input_ids"]
    stop = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    decoder = IncrementalDecoder(tiny_tok, (stop,))
    deltas = [decoder.push(token_id) for token_id in ids + [stop]]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tiny_tok.decode(ids, skip_special_tokens=True)
    assert decoder.stopped and decoder.token_count == len(ids) + 1


def test_incremental_decoding_reads_a_few_ids_per_token_not_the_whole_answer(tiny_tok):
    from character_baker.stages.serving.bridge import IncrementalDecoder

    ids = tiny_tok("a long answer, word after word, " * 20, add_special_tokens=False)["input_ids"]
    windows: list[int] = []

    class Counting:
        def decode(self, window, **options):
            windows.append(len(window))
            return tiny_tok.decode(window, **options)

    decoder = IncrementalDecoder(Counting(), ())
    text = "".join(decoder.push(token_id) for token_id in ids) + decoder.flush()
    assert text == tiny_tok.decode(ids, skip_special_tokens=True) and len(ids) > 100
    assert max(windows) <= 8  # decoding everything so far each time would read up to len(ids) ids


def test_a_burst_of_256_requests_at_the_default_settings_is_all_answered(tiny_model_dir):
    import asyncio

    from character_baker.backends.generation.hf import HFBackend
    from character_baker.core.config import SamplingConfig

    questions = [f"Question {number}?" for number in range(8)]
    with tiny_app(tiny_model_dir) as (bridge, app), app_in_thread(app) as url:  # defaults but max_tokens 8
        loaded = next(iter(bridge.weights.values()))
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
        reference = HFBackend(loaded.model, loaded.tokenizer, batch_size=1, engine="generate")
        expected = [row[0].text for row in reference.generate([[{"role": "user", "content": q}] for q in questions],
                                                               greedy)]

        async def ask(client, number: int) -> str:
            request = dict(model="tiny", messages=[{"role": "user", "content": questions[number % 8]}],
                           temperature=0, max_tokens=8)
            if number % 2:
                return (await client.chat.completions.create(**request)).choices[0].message.content
            stream = await client.chat.completions.create(**request, stream=True)
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

        async def burst() -> list:
            import openai as openai_module

            async with openai_module.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                                 timeout=300) as client:
                return await asyncio.gather(*(ask(client, number) for number in range(256)), return_exceptions=True)

        answers = asyncio.run(burst())
        assert [answer for answer in answers if isinstance(answer, BaseException)] == []
        assert answers == [expected[number % 8] for number in range(256)]
        assert loaded.engine.max_batch >= 256 and bridge.health()["queue"] == {"running": 0, "waiting": 0}
