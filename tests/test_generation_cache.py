"""Response cache, progress reporting and the backend factory."""

from __future__ import annotations

import io
import threading

import pytest

from character_baker.backends.generation import factory
from character_baker.backends.generation.base import Completion, GenerationBackend
from character_baker.backends.generation.cache import CachedBackend, ResponseCache
from character_baker.backends.generation.progress import ProgressReporter, open_progress
from character_baker.core.config import BackendConfig, ModelsConfig, SamplingConfig
from character_baker.core.errors import UserError

SAMPLING = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=16, seed=3)


class CountingBackend(GenerationBackend):
    """A deterministic fake that records every conversation it is asked to answer."""

    name, model_id = "fake", "fake-model"

    def __init__(self):
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()
        self.adapter_versions = {"persona": "v1"}

    def adapter_fingerprint(self, adapter):
        return "base" if adapter is None else self.adapter_versions[adapter]

    def generate(self, conversations, sampling, n=1, *, adapter=None, progress=None):
        with self.lock:
            self.calls.append([c[-1]["content"] for c in conversations])
        with open_progress(progress, len(conversations) * n) as reporter:
            reporter.advance(len(conversations) * n, 2 * len(conversations) * n)
        return [[Completion(f"{c[-1]['content']}|{adapter}|{sampling.seed}|{sampling.temperature}|{k}", 3, 2, "stop")
                 for k in range(n)] for c in conversations]


def chats(*names):
    return [[{"role": "user", "content": name}] for name in names]


@pytest.fixture
def inner():
    return CountingBackend()


def test_rerun_costs_nothing_and_returns_identical_results(inner, tmp_path):
    first = CachedBackend(inner, tmp_path).generate(chats("a", "b", "c"), SAMPLING, n=2)
    again = CachedBackend(inner, tmp_path).generate(chats("a", "b", "c"), SAMPLING, n=2)  # a new process, same dir
    assert again == first and inner.calls == [["a", "b", "c"]]
    assert [c.text for c in first[1]] == ["b|None|3|0.7|0", "b|None|3|0.7|1"]


def test_only_misses_reach_the_inner_backend_and_order_is_kept(inner, tmp_path):
    backend = CachedBackend(inner, tmp_path)
    backend.generate(chats("b"), SAMPLING)
    results = backend.generate(chats("a", "b", "c"), SAMPLING)
    assert inner.calls == [["b"], ["a", "c"]]
    assert [row[0].text.split("|")[0] for row in results] == ["a", "b", "c"]
    backend.generate(chats("a"), SAMPLING, n=2)  # sample 1 of "a" is new
    assert inner.calls[-1] == ["a"]


@pytest.mark.parametrize("change", [{"temperature": 1.0}, {"top_p": 0.5}, {"max_new_tokens": 8}, {"seed": 4}])
def test_changing_sampling_misses(inner, tmp_path, change):
    backend = CachedBackend(inner, tmp_path)
    backend.generate(chats("a"), SAMPLING)
    backend.generate(chats("a"), SAMPLING.model_copy(update=change))
    assert len(inner.calls) == 2


def test_changing_the_adapter_or_its_weights_misses(inner, tmp_path):
    backend = CachedBackend(inner, tmp_path)
    backend.generate(chats("a"), SAMPLING)
    backend.generate(chats("a"), SAMPLING, adapter="persona")
    backend.generate(chats("a"), SAMPLING, adapter="persona")
    inner.adapter_versions["persona"] = "v2"  # retrained adapter: new fingerprint
    backend.generate(chats("a"), SAMPLING, adapter="persona")
    assert inner.calls == [["a"]] * 3


def test_misses_are_generated_in_chunks_and_stored_as_they_finish(inner, tmp_path):
    stream = io.StringIO()
    with ProgressReporter("teacher", 5, stream=stream) as reporter:
        CachedBackend(inner, tmp_path, chunk_size=2).generate(chats(*"abcde"), SAMPLING, progress=reporter)
    assert inner.calls == [["a", "b"], ["c", "d"], ["e"]]
    assert reporter.done == 5 and "teacher: 5/5 responses (100%)" in stream.getvalue()
    assert len(ResponseCache(tmp_path)) == 5


def test_cache_is_safe_under_concurrent_threads(inner, tmp_path):
    backend = CachedBackend(inner, tmp_path)
    names = [f"q{i}" for i in range(40)]
    results, errors = {}, []

    def work(worker: int) -> None:
        try:
            results[worker] = backend.generate(chats(*names[worker * 5:worker * 5 + 20]), SAMPLING, n=2)
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(ResponseCache(tmp_path)) == 40 * 2
    again = backend.generate(chats(*names), SAMPLING, n=2)
    calls = len(inner.calls)
    assert backend.generate(chats(*names), SAMPLING, n=2) == again and len(inner.calls) == calls
    assert results[1] == again[5:25]


def test_plain_progress_lines_when_not_a_terminal():
    stream = io.StringIO()
    with ProgressReporter("student", 100, stream=stream) as reporter:
        assert reporter.mode == "plain"
        for _ in range(100):
            reporter.advance(1, 10)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("student: 10/100 responses (10%), ") and "tok/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("student: 100/100 responses (100%)")


def test_plain_progress_prints_on_time_and_at_the_end():
    stream = io.StringIO()
    with ProgressReporter("judge", 1000, stream=stream, every_seconds=0.0) as reporter:
        reporter.advance(1)
        reporter.advance(1)
    assert stream.getvalue().splitlines()[:2] == [line for line in stream.getvalue().splitlines()[:2]
                                                  if line.startswith("judge: ")]
    assert len(stream.getvalue().splitlines()) == 3  # two timed lines and the final one


def test_rich_bar_and_silent_progress():
    stream = io.StringIO()
    with ProgressReporter("teacher", 4, mode="rich", stream=stream) as reporter:
        reporter.advance(4, 100)
    assert "teacher" in stream.getvalue() and "4/4" in stream.getvalue()
    with open_progress(None, 3) as silent:
        silent.advance(3)
        assert silent.mode == "silent" and silent.done == 3


def test_factory_wraps_http_backends_in_the_cache_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    role = BackendConfig(backend="openai", model="served", base_url="http://127.0.0.1:9/v1")
    cached = factory.make_backend(role, ModelsConfig(), cache_dir=tmp_path)
    assert isinstance(cached, CachedBackend) and cached.name == "openai" and cached.model_id == "served"
    plain = factory.make_backend(role, ModelsConfig(), cache_dir=None)
    assert type(plain).__name__ == "OpenAIBackend" and plain.max_retries == role.max_retries
    with pytest.raises(UserError, match="needs a model name"):
        factory.make_backend(BackendConfig(backend="anthropic"), ModelsConfig(), cache_dir=None)


def test_factory_loads_one_hf_model_per_reference(tmp_path, monkeypatch, tiny_tok):
    from character_baker.backends import models
    from character_baker.testing import tiny_model

    loads = []
    def fake_load(ref, cfg):
        loads.append(ref)
        return tiny_model("llama", tiny_tok), tiny_tok

    monkeypatch.setattr(models, "load_model", fake_load)
    shared: dict = {}
    teacher = factory.make_backend(BackendConfig(batch_size=8), ModelsConfig(base="base-model"), cache_dir=tmp_path,
                                   shared=shared)
    student = factory.make_backend(BackendConfig(), ModelsConfig(base="base-model"), cache_dir=tmp_path, shared=shared)
    other = factory.make_backend(BackendConfig(model="other-model"), ModelsConfig(base="base-model"), cache_dir=None,
                                 shared=shared)
    assert loads == ["base-model", "other-model"]
    assert teacher.inner is student.inner and teacher.inner.batch_size == 8
    assert teacher.model_id == "base-model" and other.model_id == "other-model"
