"""Label log-probs (constrained choices) in every backend: exact on hf and vllm, first token on openai, none on anthropic."""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace

import pytest

from character_baker.backends.generation import CachedBackend
from character_baker.backends.generation.anthropic_backend import AnthropicBackend
from character_baker.backends.generation.base import encode_prompt
from character_baker.backends.generation.choices import first_token_label_logprobs, labels_per_conversation
from character_baker.backends.generation.hf import HFBackend
from character_baker.backends.generation.vllm_backend import VLLMBackend
from tests.test_generation_http import StandIn, openai_backend
from tests.test_scoring import direct_logprob

CHATS = [[{"role": "user", "content": "Is the sea wet? Reply with only yes or no."}],
         [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "Pick 1 or 2."}]]


def label_ids(tokenizer, conversation, label):
    prompt = encode_prompt(tokenizer, conversation)
    whole = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) + label,
                      add_special_tokens=False)["input_ids"]
    return prompt, list(whole[len(prompt):])


def test_hf_label_logprobs_are_the_labels_exact_log_probability(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    backend = HFBackend(model, tokenizer, batch_size=3)
    labels = [["yes", "no"], ["1", "2", "INVALID"]]
    scores = backend.label_logprobs(CHATS, labels)
    for conversation, row, got in zip(CHATS, labels, scores):
        assert list(got) == row
        for label in row:
            assert got[label] == pytest.approx(direct_logprob(model, *label_ids(tokenizer, conversation, label)),
                                               abs=1e-4)
    assert math.exp(scores[0]["yes"]) < 1 and all(v < 0 for v in scores[1].values())
    assert backend.label_logprobs(CHATS, ["a", "b"])[1].keys() == {"a", "b"}  # one list for every conversation
    cached = CachedBackend(backend, tmp_path / "cache")
    assert cached.label_logprobs(CHATS, labels) == scores  # the cache passes label log-probs through
    with pytest.raises(ValueError, match="unknown adapter|no adapters"):
        backend.label_logprobs(CHATS, labels, adapter="missing")


def test_label_lists_are_checked():
    assert labels_per_conversation(["a", "b"], 2) == [["a", "b"], ["a", "b"]]
    for bad in ([["a", "a"]], [[]], [["a"], ["b"]]):
        with pytest.raises(ValueError):
            labels_per_conversation(bad, 1)


def test_first_token_maps_prefixes_to_exactly_one_label():
    top = [(" 1", math.log(0.5)), ("2", math.log(0.2)), ("IN", math.log(0.1)), ("1", math.log(0.1)), ("x", -1.0)]
    scores = first_token_label_logprobs(top, ["1", "2", "INVALID"])
    assert scores["1"] == pytest.approx(math.log(0.6)) and scores["2"] == pytest.approx(math.log(0.2))
    assert scores["INVALID"] == pytest.approx(math.log(0.1))
    ambiguous = first_token_label_logprobs([("cu", -0.1), ("stoic", -3.0)], ["curious", "cunning", "stoic"])
    assert ambiguous == {"curious": -math.inf, "cunning": -math.inf, "stoic": -3.0}
    assert first_token_label_logprobs([("maybe", -0.1)], ["yes", "no"]) is None


def openai_logprobs_reply(path, body):
    """A chat completion whose first token's top log-probs favour '2'; echoes what was asked."""
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    top = [{"token": "2", "logprob": math.log(0.7), "bytes": None},
           {"token": " 1", "logprob": math.log(0.2), "bytes": None},
           {"token": "Sure", "logprob": math.log(0.1), "bytes": None}]
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "2"},
                         "logprobs": {"content": [{"token": "2", "logprob": top[0]["logprob"], "bytes": None,
                                                   "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}}


def test_openai_label_logprobs_from_the_first_tokens_top_list(monkeypatch):
    monkeypatch.setenv("CB_TEST_KEY", "k")
    with StandIn(openai_logprobs_reply) as server:
        scores = openai_backend(server, "CB_TEST_KEY").label_logprobs(CHATS, [["yes", "no"], ["1", "2"]],
                                                                      adapter="judge-lora")
    assert scores[0] is None  # no returned token names yes or no: the judge falls back to free text
    assert scores[1]["2"] == pytest.approx(math.log(0.7)) and scores[1]["1"] == pytest.approx(math.log(0.2))
    assert sorted(map(str, (r["messages"] for r in server.requests))) == sorted(map(str, CHATS))
    assert {r["model"] for r in server.requests} == {"judge-lora"}
    assert all(r["temperature"] == 0.0 for r in server.requests)


def test_anthropic_has_no_label_logprobs(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    assert AnthropicBackend("claude-test", base_url="http://127.0.0.1:9").label_logprobs(CHATS, ["1", "2"]) is None


class PromptLogprobLLM:
    """A vLLM stand-in that returns prompt log-probs: -0.5 per prompt token, except -2.0 for token id 5."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, params, lora_request))
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            logprobs = [None] + [{token: SimpleNamespace(logprob=-2.0 if token == 5 else -0.5)} for token in ids[1:]]
            outputs.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=logprobs,
                                           outputs=[SimpleNamespace(text="", token_ids=[1], finish_reason="length")]))
        return outputs


def test_vllm_label_logprobs_sum_the_labels_prompt_logprobs(monkeypatch, tiny_tok):
    engine = PromptLogprobLLM(tiny_tok)
    vllm = types.ModuleType("vllm")
    vllm.LLM = lambda **kwargs: engine
    vllm.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    scores = VLLMBackend("base/model").label_logprobs(CHATS, [["yes", "no"], ["1", "INVALID"]])
    prompts, params, lora = engine.calls[0]
    assert (params.max_tokens, params.prompt_logprobs) == (1, 0) and lora is None
    for conversation, got in zip(CHATS, scores):
        for label, value in got.items():
            prompt, ids = label_ids(tiny_tok, conversation, label)
            assert {"prompt_token_ids": prompt + ids} in prompts
            assert value == pytest.approx(sum(-2.0 if token == 5 else -0.5 for token in ids))
