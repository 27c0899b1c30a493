"""`character-baker serve RUNS_FOLDER`: two characters on one loaded base, answering a burst of 200 requests.

One server for the module: the real CLI in a subprocess serving a folder with two runs (pirate and
sarcastic, each a persona adapter with its own non-zero LoRA weights on the same tiny Llama). The
expected answers come from an independent path: plain `model.generate` (HFBackend, one prompt at a
time) with each adapter loaded by PEFT, greedy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve_kit import cli_server, make_run

KEY = "sk-many"
MAX_TOKENS = 16
QUESTIONS = [f"Question {number}: {topic}?" for number, topic in
             enumerate(["who are you", "what is the sea", "tell me about yourself", "write a poem",
                        "what is 2 + 2", "where is Paris", "do you sail", "how can I help"] * 3)]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("serve-many")
    make_run(root / "runs", tiny_model_dir, "pirate", seed=0)
    make_run(root / "runs", tiny_model_dir, "sarcastic", seed=1, rank=4)
    return root


@pytest.fixture(scope="module")
def server(runs_root):
    with cli_server([str(runs_root / "runs"), "--max-tokens", str(MAX_TOKENS), "--max-concurrency", "16"],
                    runs_root, KEY) as url:
        yield url


@pytest.fixture(scope="module")
def expected(runs_root, tiny_model_dir) -> dict[str, list[str]]:
    """Model id -> the greedy answer to each of QUESTIONS, from plain generate with PEFT adapters."""
    from character_baker.backends.generation.hf import HFBackend
    from character_baker.backends.models import load_model
    from character_baker.core.config import ModelsConfig, SamplingConfig

    model, tokenizer = load_model(str(tiny_model_dir), ModelsConfig(device="cpu"))
    backend = HFBackend(model, tokenizer, batch_size=1, engine="generate")
    for name in ("pirate", "sarcastic"):
        backend.load_adapter(runs_root / "runs" / name / "adapters" / "persona", name)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=MAX_TOKENS)
    conversations = [[{"role": "user", "content": question}] for question in QUESTIONS]
    return {model_id: [row[0].text for row in backend.generate(conversations, greedy, adapter=adapter)]
            for model_id, adapter in (("pirate", "pirate"), ("sarcastic", "sarcastic"),
                                      (Path(tiny_model_dir).name, None))}


def test_two_runs_answer_under_their_own_names_on_one_loaded_base(server, expected, tiny_model_dir):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
    base = Path(tiny_model_dir).name
    assert [model.id for model in client.models.list()] == ["pirate", "sarcastic", base]
    answers = {}
    for model_id in ("pirate", "sarcastic", base):
        reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                               temperature=0, max_tokens=MAX_TOKENS)
        assert reply.model == model_id
        answers[model_id] = reply.choices[0].message.content
    assert answers == {model_id: texts[0] for model_id, texts in expected.items()}
    assert len(set(answers.values())) == 3  # each character answers with its own adapter, the base with none
    health = httpx.get(f"{server}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [(entry["base"], entry["models"]) for entry in health["bases"]] == [(base, ["pirate", "sarcastic", base])]


async def one_request(client: openai.AsyncOpenAI, model_id: str, question: str, stream: bool) -> str:
    """One chat request; a stream must be one role chunk, content chunks, then one finish chunk."""
    ask = dict(model=model_id, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=MAX_TOKENS)
    if not stream:
        return (await client.chat.completions.create(**ask)).choices[0].message.content
    chunks = [chunk async for chunk in await client.chat.completions.create(**ask, stream=True)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [bool(chunk.choices[0].finish_reason) for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def test_a_burst_of_200_requests_is_all_answered_each_with_its_own_tokens_in_order(server, expected):
    models = list(expected)
    plan = [(models[number % 3], number % len(QUESTIONS), number % 2 == 0) for number in range(200)]

    async def burst() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one_request(client, model_id, QUESTIONS[question], stream)
                                          for model_id, question, stream in plan), return_exceptions=True)

    answers = asyncio.run(burst())
    failures = [answer for answer in answers if isinstance(answer, BaseException)]
    assert not failures, failures[:3]
    assert answers == [expected[model_id][question] for model_id, question, _ in plan]
