"""On-disk response cache: a rerun of any generation costs nothing.

A response is keyed by everything that determines it: backend name, model id, adapter
fingerprint (a hash of the adapter's weights and config for local backends), the messages,
the sampling settings (temperature, top_p, max_new_tokens, seed) and the sample index.
The store is one SQLite file (`<cache_dir>/responses.sqlite`, WAL mode), safe to share between
threads and processes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from character_baker.backends.generation.base import Completion, GenerationBackend, Messages, check_request
from character_baker.backends.generation.progress import ProgressReporter, open_progress
from character_baker.core.runs import stable_hash

if TYPE_CHECKING:
    from character_baker.core.config import SamplingConfig

CACHE_FILE = "responses.sqlite"
_SQL_PARAMS = 500  # keys per SELECT (SQLite limits bound parameters)


def response_key(backend: str, model_id: str, adapter_fingerprint: str, messages: Messages,
                 sampling: "SamplingConfig", sample_index: int) -> str:
    """The cache key of one sample of one conversation."""
    return stable_hash({
        "backend": backend, "model": model_id, "adapter": adapter_fingerprint, "messages": messages,
        "temperature": sampling.temperature, "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed, "sample": sample_index,
        **({"repetition_penalty": sampling.repetition_penalty} if sampling.repetition_penalty != 1.0 else {}),
    }, length=32)


class ResponseCache:
    """A SQLite table of key -> Completion; one connection guarded by a lock."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        """The cached completions among `keys`."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Completion] = {}
        with self._lock:
            for start in range(0, len(keys), _SQL_PARAMS):
                chunk = keys[start:start + _SQL_PARAMS]
                rows = self._db.execute(f"SELECT key, value FROM responses WHERE key IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall()
                found.update((key, Completion.from_dict(json.loads(value))) for key, value in rows)
        return found

    def put_many(self, items: dict[str, Completion]) -> None:
        """Store completions in one transaction; keys already present keep their first value."""
        rows = [(key, json.dumps(completion.to_dict(), ensure_ascii=False)) for key, completion in items.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR IGNORE INTO responses (key, value) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()


class CachedBackend(GenerationBackend):
    """Wraps a backend: cached samples come from disk, only conversations with a miss go to `inner`.

    Misses are generated `chunk_size` conversations at a time and stored after each chunk, so an
    interrupted run keeps what it finished. Other attributes (e.g. `load_adapter`) reach `inner`.
    """

    def __init__(self, inner: GenerationBackend, cache_dir: str | Path, *, chunk_size: int = 256):
        self.inner = inner
        self.cache = ResponseCache(cache_dir)
        self.chunk_size = chunk_size

    @property
    def name(self) -> str:  # type: ignore[override]
        """The inner backend's name (part of the cache key)."""
        return self.inner.name

    @property
    def model_id(self) -> str:  # type: ignore[override]
        """The inner backend's model id (part of the cache key)."""
        return self.inner.model_id

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "inner":  # not set yet (during unpickling): avoid infinite recursion
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    def adapter_fingerprint(self, adapter: str | None) -> str:
        """The inner backend's fingerprint."""
        return self.inner.adapter_fingerprint(adapter)

    def label_logprobs(self, conversations: list[Messages], labels: Any, *,
                       adapter: str | None = None) -> list[dict[str, float] | None] | None:
        """The inner backend's label log-probs (not cached here: the judge stores its verdicts)."""
        return self.inner.label_logprobs(conversations, labels, adapter=adapter)

    def generate(self, conversations: list[Messages], sampling: "SamplingConfig", n: int = 1, *,
                 adapter: str | None = None,
                 progress: "str | ProgressReporter | None" = None) -> list[list[Completion]]:
        """n completions per conversation, in input order; only misses reach the inner backend."""
        check_request(conversations, n)
        fingerprint = self.inner.adapter_fingerprint(adapter)
        keys = [[response_key(self.name, self.model_id, fingerprint, conversation, sampling, sample)
                 for sample in range(n)] for conversation in conversations]
        known = self.cache.get_many(key for row in keys for key in row)
        missing = [index for index, row in enumerate(keys) if any(key not in known for key in row)]
        with open_progress(progress, len(conversations) * n) as reporter:
            reporter.advance((len(conversations) - len(missing)) * n)
            for start in range(0, len(missing), self.chunk_size):
                chunk = missing[start:start + self.chunk_size]
                fresh = self.inner.generate([conversations[i] for i in chunk], sampling, n, adapter=adapter,
                                            progress=reporter)
                new = {key: completion for i, row in zip(chunk, fresh) for key, completion in zip(keys[i], row)}
                self.cache.put_many(new)
                known.update({key: value for key, value in new.items() if key not in known})
        return [[known[key] for key in row] for row in keys]
