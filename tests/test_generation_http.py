"""The openai and anthropic backends against local HTTP stand-ins started by the tests (loopback only)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from character_baker.backends.generation.anthropic_backend import AnthropicBackend, split_system
from character_baker.backends.generation.openai_backend import OpenAIBackend
from character_baker.core.config import SamplingConfig
from character_baker.core.errors import UserError

SAMPLING = SamplingConfig(temperature=0.5, top_p=0.9, max_new_tokens=32, seed=11)
KEY = "sk-test-123"


class StandIn:
    """A chat API stand-in on 127.0.0.1:<random port>: scripted failures, a concurrency gauge, a request log."""

    def __init__(self, reply, *, failures=(), delay_s=0.0):
        self.reply, self.failures, self.delay_s = reply, list(failures), delay_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.peak_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stand_in.lock:
                    stand_in.requests.append(body)
                    stand_in.headers.append({k.lower(): v for k, v in self.headers.items()})
                    failure = stand_in.failures.pop(0) if stand_in.failures else None
                    stand_in.in_flight += 1
                    stand_in.peak_in_flight = max(stand_in.peak_in_flight, stand_in.in_flight)
                try:
                    time.sleep(stand_in.delay_s)
                    status, payload = (failure, {"error": {"message": "try again", "type": "server_error"}}) \
                        if failure else (200, stand_in.reply(self.path, body))
                finally:
                    with stand_in.lock:
                        stand_in.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def last_user_text(messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def openai_reply(honour_n: bool):
    """Chat-completions replies that echo the last user message and the request's seed."""
    def reply(path, body):
        assert path == "/v1/chat/completions"
        choices = body.get("n", 1) if honour_n else 1
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": i, "finish_reason": "length" if body["max_tokens"] < 5 else "stop",
                             "message": {"role": "assistant",
                                         "content": f"{last_user_text(body['messages'])}|seed={body['seed']}|{i}"}}
                            for i in range(choices)],
                "usage": {"prompt_tokens": 7, "completion_tokens": 4 * choices, "total_tokens": 7 + 4 * choices}}
    return reply


def anthropic_reply(path, body):
    assert path == "/v1/messages"
    prefill = body["messages"][-1]["content"] if body["messages"][-1]["role"] == "assistant" else ""
    return {"id": "msg", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": f" continued {last_user_text(body['messages'])}" if prefill
                         else f"[{body.get('system', '')}] {last_user_text(body['messages'])}"}],
            "stop_reason": "max_tokens" if body["max_tokens"] < 5 else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 9, "output_tokens": 3}}


def sent_key(headers: dict) -> str:
    """The API key a request carried (x-api-key, or a bearer token: SDK versions differ)."""
    return headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")


def conversations(count: int):
    return [[{"role": "user", "content": f"question {i}"}] for i in range(count)]


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("CB_TEST_KEY", KEY)
    return "CB_TEST_KEY"


def openai_backend(server: StandIn, api_key: str, **options) -> OpenAIBackend:
    return OpenAIBackend("tiny-chat", base_url=f"{server.url}/v1", api_key_env=api_key,
                         retry_base_delay_s=0.01, **options)


@pytest.mark.parametrize("honour_n", [True, False])
def test_openai_n_samples_in_order_with_key_from_env(api_key, honour_n):
    with StandIn(openai_reply(honour_n)) as server:
        results = openai_backend(server, api_key).generate(conversations(5), SAMPLING, n=3)
    assert [[c.text.split("|")[0] for c in row] for row in results] == [[f"question {i}"] * 3 for i in range(5)]
    for row in results:
        assert len({c.text for c in row}) == 3  # three distinct samples, whether or not the server honours n
    assert all(sent_key(h) == KEY for h in server.headers)
    assert len(server.requests) == (5 if honour_n else 15)
    first = server.requests[0]
    assert (first["model"], first["temperature"], first["top_p"], first["max_tokens"]) == ("tiny-chat", 0.5, 0.9, 32)
    assert results[0][0].prompt_tokens == 7 and results[0][0].finish_reason == "stop"


def test_openai_retries_429_and_500_then_succeeds(api_key):
    with StandIn(openai_reply(True), failures=[429, 500, 503]) as server:
        results = openai_backend(server, api_key, max_retries=3, max_concurrency=1).generate(conversations(2), SAMPLING)
    assert [row[0].text.split("|")[0] for row in results] == ["question 0", "question 1"]
    assert len(server.requests) == 5


def test_openai_gives_up_after_max_retries(api_key):
    import openai

    with StandIn(openai_reply(True), failures=[500, 500, 500]) as server:
        with pytest.raises(openai.InternalServerError):
            openai_backend(server, api_key, max_retries=1).generate(conversations(1), SAMPLING)
    assert len(server.requests) == 2


def test_openai_rejected_key_is_a_user_error(api_key):
    with StandIn(openai_reply(True), failures=[401]) as server:
        with pytest.raises(UserError, match="rejected the API key"):
            openai_backend(server, api_key).generate(conversations(1), SAMPLING)


def test_openai_concurrency_is_bounded(api_key):
    with StandIn(openai_reply(True), delay_s=0.05) as server:
        openai_backend(server, api_key, max_concurrency=3).generate(conversations(12), SAMPLING)
    assert server.peak_in_flight == 3


def test_openai_adapter_is_sent_as_the_model_and_prefill_as_is(api_key):
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy"}]
    with StandIn(openai_reply(True)) as server:
        openai_backend(server, api_key).generate([prefill], SAMPLING, adapter="persona")
    assert server.requests[0]["model"] == "persona" and server.requests[0]["messages"] == prefill


def test_missing_key_variable_is_a_user_error(monkeypatch):
    monkeypatch.delenv("CB_MISSING_KEY", raising=False)
    for backend in (OpenAIBackend, AnthropicBackend):
        with pytest.raises(UserError, match="CB_MISSING_KEY"):
            backend("m", base_url="http://127.0.0.1:9", api_key_env="CB_MISSING_KEY")


def test_anthropic_system_prefill_n_and_retries(api_key):
    chats = [[{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "question 0"}],
             [{"role": "user", "content": "question 1"}, {"role": "assistant", "content": "Arr "}]]
    with StandIn(anthropic_reply, failures=[529]) as server:
        backend = AnthropicBackend("claude-test", base_url=server.url, api_key_env=api_key, retry_base_delay_s=0.01)
        results = backend.generate(chats, SAMPLING, n=2)
    assert [c.text for c in results[0]] == ["[Be a pirate.] question 0"] * 2
    assert [c.text for c in results[1]] == [" continued question 1"] * 2
    assert (results[0][0].prompt_tokens, results[0][0].completion_tokens, results[0][0].finish_reason) == (9, 3, "stop")
    assert len(server.requests) == 5  # 2 conversations x 2 samples + 1 retry
    assert all(sent_key(h) == KEY for h in server.headers)
    sent = next(r for r in server.requests if r["messages"][-1]["role"] == "assistant")
    assert sent["messages"][-1]["content"] == "Arr" and "system" not in sent
    assert next(r for r in server.requests if "system" in r)["max_tokens"] == 32


def test_anthropic_default_key_variable_and_length_finish(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    system, turns = split_system([{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                                  {"role": "user", "content": "q"}])
    assert system == "a\n\nb" and turns == [{"role": "user", "content": "q"}]
    short = SAMPLING.model_copy(update={"max_new_tokens": 3})
    with StandIn(anthropic_reply) as server:
        completion = AnthropicBackend("claude-test", base_url=server.url).generate(conversations(1), short)[0][0]
    assert completion.finish_reason == "length" and sent_key(server.headers[0]) == KEY
    with pytest.raises(ValueError, match="no adapters"):
        AnthropicBackend("claude-test", base_url=server.url).generate(conversations(1), short, adapter="persona")
