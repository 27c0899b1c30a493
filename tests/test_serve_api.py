"""`character-baker serve RUN` on transformers, driven with the official openai client and raw HTTP.

One server runs for the module: the real CLI in a subprocess on 127.0.0.1:<free port>, serving a
run directory whose persona adapter (non-zero LoRA weights) sits on a tiny Llama, with the API key
taken from CHARACTER_BAKER_API_KEY. A few in-process tests build the app directly.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

KEY = "sk-serve-test"
MAX_TOKENS = 24
MAX_BODY = 4096
PIRATE = Path(__file__).resolve().parents[1] / "constitutions" / "pirate.yaml"
HELLO = [{"role": "user", "content": "Who are you?"}]


def make_run(root: Path, base_dir: Path) -> Path:
    """A run directory as train leaves it: manifest (recipe, constitution) and adapters/persona/."""
    import torch

    from character_baker.backends.models import attach_lora
    from character_baker.core.config import LoraConfig, ModelsConfig, Recipe
    from character_baker.core.constitution import load_constitution
    from character_baker.core.runs import RunDir
    from character_baker.testing import tiny_model, tiny_tokenizer

    run = RunDir.create(root / "pirate")
    model = attach_lora(tiny_model("llama", tiny_tokenizer()), LoraConfig(r=8, alpha=16), seed=0)
    with torch.no_grad():  # a fresh adapter is the identity (B = 0): give it weights that change answers
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    model.save_pretrained(run.path("adapters", "persona"))
    recipe = Recipe(models=ModelsConfig(base=str(base_dir), device="cpu"))
    run.update_manifest(recipe=recipe.model_dump(mode="json"),
                        constitution={"name": "pirate", "path": str(PIRATE),
                                      "hash": load_constitution(PIRATE).content_hash()})
    return run.root


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    """Poll /health until it answers 200; fail with the server's output if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"serve did not become healthy in {timeout_s}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """The CLI serving the run on a free loopback port; yields its base URL."""
    root = tmp_path_factory.mktemp("serve-api")
    run = make_run(root / "runs", tiny_model_dir)
    port = free_port()
    env = {**os.environ, "CHARACTER_BAKER_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CHARACTER_BAKER_CACHE": str(root / "cache")}
    log = root / "serve.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "character_baker", "serve", str(run), "--engine", "transformers", "--port",
             str(port), "--max-tokens", str(MAX_TOKENS), "--max-concurrency", "2", "--max-body-bytes", str(MAX_BODY)],
            env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


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


def test_the_page_and_its_config_name_both_panes(server, tiny_model_dir):
    auth = {"Authorization": f"Bearer {KEY}"}
    page = httpx.get(f"{server}/", headers=auth)
    assert page.status_code == 200 and 'id="panes"' in page.text
    assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]
    panes = httpx.get(f"{server}/page/config", headers=auth).json()["panes"]
    assert [pane["model"] for pane in panes] == ["pirate", Path(tiny_model_dir).name]
    assert panes[0]["system_prompt"] is None and "Captain Rook" in panes[1]["system_prompt"]


# ----------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def one_slot_app(tiny_model_dir):
    """The app serving the tiny model with one generation slot and no API key."""
    from character_baker.core.config import ModelsConfig
    from character_baker.stages.serving.app import ServeSettings, create_app
    from character_baker.stages.serving.bridge import GenerationBridge
    from character_baker.stages.serving.target import Pane, ServedModel, ServeTarget

    target = ServeTarget(models=(ServedModel("tiny", str(tiny_model_dir)),), panes=(Pane("tiny", "tiny"),),
                         models_config=ModelsConfig(device="cpu"))
    bridge = GenerationBridge.load(target, max_concurrency=1, max_tokens=8)
    return bridge, create_app(bridge, target, ServeSettings(max_tokens=8, max_concurrency=1))


def test_without_a_key_routes_are_open_and_busy_slots_give_429(one_slot_app):
    from fastapi.testclient import TestClient

    bridge, app = one_slot_app
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4}
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        assert test_client.get("/health").json() == {"status": "ok", "models": ["tiny"]}
        assert bridge.slots.acquire(blocking=False)
        try:
            busy = test_client.post("/v1/chat/completions", json=body)
        finally:
            bridge.slots.release()
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert "--max-concurrency" in busy.json()["error"]["message"]
        assert test_client.post("/v1/chat/completions", json=body).status_code == 200


def test_incremental_decoding_matches_decoding_everything_at_once(tiny_tok):
    from character_baker.stages.serving.bridge import IncrementalDecoder

    ids = tiny_tok("Ahoy, h\u00e9llo \u4e16\u754c!\nnext line \u2603 end", add_special_tokens=False)["input_ids"]
    stop = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    decoder = IncrementalDecoder(tiny_tok, (stop,))
    deltas = [decoder.push(token_id) for token_id in ids + [stop]]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tiny_tok.decode(ids, skip_special_tokens=True)
    assert decoder.stopped and decoder.token_count == len(ids) + 1
