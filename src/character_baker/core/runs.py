"""Run directories: layout, manifest, atomic writes, resumable JSONL stores, input hashing.

    runs/<name>/manifest.json   resolved config, hashes, versions, seeds, per-stage status
    runs/<name>/data/ adapters/<stage>/ model/ profile/ eval/ logs/
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

SUBDIRS = ("data", "adapters", "model", "profile", "eval", "logs")
MANIFEST = "manifest.json"


def stable_hash(value: Any, length: int = 16) -> str:
    """A short sha256 of a JSON-serialisable value with sorted keys."""
    payload = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def file_hash(path: str | Path, length: int = 16) -> str:
    """sha256 of a file's bytes, or of every file under a folder (sorted by relative path)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:length]


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_adapter_folder(folder: str | Path) -> bool:
    """True when `folder` holds a complete PEFT adapter (config and weights)."""
    return all((Path(folder) / name).is_file() for name in ADAPTER_FILES)


def canonical_adapter_config(folder: str | Path) -> None:
    """Rewrite a PEFT adapter_config.json with `target_modules` sorted, so equal adapters are equal bytes.

    PEFT (0.13-0.21 at least) stores `target_modules` as a set and writes it in the set's
    iteration order, which changes with every process's hash seed.
    """
    path = Path(folder) / ADAPTER_FILES[0]
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter_hash(folder: str | Path) -> str | None:
    """Hash of a PEFT adapter's config and weights (checkpoints and logs left out); None when incomplete.

    The config is hashed as data, not bytes: PEFT writes `target_modules` from a Python set, so its
    order changes with the process's hash seed, and two identical adapters would hash apart.
    """
    if not is_adapter_folder(folder):
        return None
    config = json.loads((Path(folder) / ADAPTER_FILES[0]).read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return stable_hash([config, file_hash(Path(folder) / ADAPTER_FILES[1])])


def _umask_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file (0o666 less the process umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    The file gets the permissions a plain write would give it (an existing file keeps its mode),
    not the owner-only 0600 of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else _umask_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, value: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


class JsonlStore:
    """Append-only JSON lines keyed by record `id`; resumes by skipping ids already written.

    Each record is written as one line and flushed+fsynced, so a kill loses at most the record
    in flight. A torn last line (killed mid-write) is truncated away when the store is opened.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ids: set[str] = set()
        self._repair_and_index()

    def _repair_and_index(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with open(self.path, "rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    break
                self._ids.add(record["id"])
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(good_bytes)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> set[str]:
        """Ids already written."""
        return set(self._ids)

    def append(self, record: dict[str, Any]) -> bool:
        """Append one record unless its id is already present; return whether it was written."""
        if record["id"] in self._ids:
            return False
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._ids.add(record["id"])
        return True

    def extend(self, records: Iterable[dict[str, Any]]) -> int:
        """Append many records; return how many were new."""
        return sum(self.append(r) for r in records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(read_jsonl(self.path))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a JSONL file (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write a whole JSONL file atomically (for files that are not append-only)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


@dataclass
class RunDir:
    """A run directory and its manifest."""

    root: Path

    @classmethod
    def create(cls, root: str | Path) -> "RunDir":
        """Create (or reopen) a run directory with its sub-folders and a manifest."""
        run = cls(Path(root))
        for sub in SUBDIRS:
            (run.root / sub).mkdir(parents=True, exist_ok=True)
        if not run.manifest_path.exists():
            atomic_write_json(run.manifest_path, {"name": run.root.name, "created": time.time(), "stages": {}})
        return run

    @classmethod
    def open(cls, root: str | Path) -> "RunDir":
        """Open an existing run directory; raise FileNotFoundError when it has no manifest."""
        run = cls(Path(root))
        if not run.manifest_path.exists():
            raise FileNotFoundError(run.manifest_path)
        return run

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def path(self, *parts: str) -> Path:
        """A path inside the run directory."""
        return self.root.joinpath(*parts)

    def manifest(self) -> dict[str, Any]:
        """The manifest as a dict."""
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Set top-level manifest fields atomically."""
        manifest = self.manifest()
        manifest.update(fields)
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def stage(self, stage: str) -> dict[str, Any]:
        """The manifest entry of one stage ({} if it never ran)."""
        return self.manifest().get("stages", {}).get(stage, {})

    def set_stage(self, stage: str, **fields: Any) -> None:
        """Merge fields into one stage's manifest entry atomically."""
        manifest = self.manifest()
        entry = manifest.setdefault("stages", {}).setdefault(stage, {})
        entry.update(fields)
        atomic_write_json(self.manifest_path, manifest)

    def is_stage_current(self, stage: str, inputs_hash: str) -> bool:
        """True when the stage completed with exactly these inputs (so it can be skipped)."""
        entry = self.stage(stage)
        return entry.get("status") == "done" and entry.get("inputs_hash") == inputs_hash


def list_runs(root: str | Path = "runs") -> list[RunDir]:
    """Every run directory (one holding a manifest) under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [RunDir(p) for p in root.iterdir() if (p / MANIFEST).is_file()]
    return sorted(runs, key=lambda r: r.manifest_path.stat().st_mtime, reverse=True)
