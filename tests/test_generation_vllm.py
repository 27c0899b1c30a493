"""The vllm backend: the not-installed message, and request building against a fake `vllm` module."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from character_baker.backends.generation.base import encode_prompt
from character_baker.backends.generation.vllm_backend import VLLMBackend, lora_rank_limit
from character_baker.core.config import SamplingConfig
from character_baker.core.errors import UserError

SAMPLING = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=20, seed=5)


class FakeLLM:
    """Records how it was built and called; answers with canned outputs."""

    instances: list["FakeLLM"] = []

    def __init__(self, tokenizer, **kwargs):
        self.kwargs, self.tokenizer, self.calls = kwargs, tokenizer, []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, params, lora_request))
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                outputs=[SimpleNamespace(text=f"answer {i}.{k}", token_ids=[1] * (k + 2),
                                                         finish_reason="length" if k else "stop")
                                         for k in range(params.n)])
                for i, p in enumerate(prompts)]


@pytest.fixture
def fake_vllm(monkeypatch, tiny_tok):
    """A stand-in `vllm` package (LLM, SamplingParams, lora.request.LoRARequest) in sys.modules."""
    FakeLLM.instances.clear()
    vllm = types.ModuleType("vllm")
    vllm.LLM = lambda **kwargs: FakeLLM(tiny_tok, **kwargs)
    vllm.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, number, path: SimpleNamespace(lora_name=name, lora_int_id=number, lora_path=path)
    for name, module in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return vllm


def adapter_folder(path, rank: int):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return path


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'character-baker\[vllm\]'"):
        VLLMBackend("some/model")


def test_lora_rank_rounds_up_to_a_supported_value():
    assert [lora_rank_limit(r) for r in (4, 8, 48, 64, 65, 300)] == [8, 8, 64, 64, 128, 320]
    with pytest.raises(UserError):
        lora_rank_limit(1024)


def test_requests_carry_sampling_lora_and_rendered_prompts(fake_vllm, tiny_tok, tmp_path):
    backend = VLLMBackend("base/model", model_id="base", seed=1)
    backend.load_adapter(adapter_folder(tmp_path / "distill", 48), "distill")
    backend.load_adapter(adapter_folder(tmp_path / "introspect", 16), "introspect")
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy"}]]
    results = backend.generate(chats, SAMPLING, n=2, adapter="introspect")
    engine = FakeLLM.instances[0]
    assert engine.kwargs["enable_lora"] and engine.kwargs["max_lora_rank"] == 64 and engine.kwargs["max_loras"] == 2
    assert engine.kwargs["model"] == "base/model" and engine.kwargs["seed"] == 1
    prompts, params, lora = engine.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == [encode_prompt(tiny_tok, c) for c in chats]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.seed) == (2, 0.7, 0.95, 20, 5)
    assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("introspect", 2, str(tmp_path / "introspect"))
    assert [[c.text for c in row] for row in results] == [["answer 0.0", "answer 0.1"], ["answer 1.0", "answer 1.1"]]
    assert [(c.finish_reason, c.completion_tokens) for c in results[1]] == [("stop", 2), ("length", 3)]
    assert results[1][0].prompt_tokens == len(encode_prompt(tiny_tok, chats[1]))
    backend.generate(chats[:1], SAMPLING)
    assert engine.calls[1][2] is None and len(FakeLLM.instances) == 1  # base weights, same engine


def test_adapters_after_engine_start_need_room(fake_vllm, tmp_path):
    backend = VLLMBackend("base/model")
    backend.generate([[{"role": "user", "content": "hi"}]], SAMPLING)
    assert "enable_lora" not in FakeLLM.instances[0].kwargs
    with pytest.raises(UserError, match="max_lora_rank"):
        backend.load_adapter(adapter_folder(tmp_path / "late", 8), "late")
    roomy = VLLMBackend("base/model", max_lora_rank=32)
    roomy.generate([[{"role": "user", "content": "hi"}]], SAMPLING)
    roomy.load_adapter(adapter_folder(tmp_path / "later", 32), "later")
    assert roomy.adapter_fingerprint("later") != roomy.adapter_fingerprint(None)
