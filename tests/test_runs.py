"""Run directories, manifest, atomic writes, resumable JSONL stores, hashing."""

import json
import os

from character_baker.core.runs import (JsonlStore, RunDir, atomic_write_json, file_hash, list_runs, read_jsonl,
                                       stable_hash)


def test_run_layout_and_manifest(tmp_path):
    run = RunDir.create(tmp_path / "runs" / "pirate")
    for sub in ("data", "adapters", "model", "profile", "eval", "logs"):
        assert (run.root / sub).is_dir()
    run.set_stage("prompts", status="done", inputs_hash="abc", seconds=1.5)
    assert run.is_stage_current("prompts", "abc")
    assert not run.is_stage_current("prompts", "abd")
    assert not run.is_stage_current("distill", "abc")
    assert RunDir.open(run.root).stage("prompts")["seconds"] == 1.5
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["pirate"]


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "new.json", {"a": 1})
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        os.chmod(tmp_path / "new.json", 0o640)
        atomic_write_json(tmp_path / "new.json", {"a": 2})
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode
    finally:
        os.umask(old)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    atomic_write_json(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["x.json"]


def test_jsonl_store_resumes_by_id_and_repairs_torn_line(tmp_path):
    path = tmp_path / "data.jsonl"
    store = JsonlStore(path)
    assert store.append({"id": "a", "v": 1})
    assert not store.append({"id": "a", "v": 2})  # never duplicates
    store.append({"id": "b", "v": 2})
    with open(path, "a") as handle:  # a kill in the middle of writing the third record
        handle.write('{"id": "c", "v"')
    reopened = JsonlStore(path)
    assert reopened.ids == {"a", "b"}
    reopened.append({"id": "c", "v": 3})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_hashes_are_stable(tmp_path):
    assert stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("x")
    first = file_hash(tmp_path / "d")
    (tmp_path / "d" / "f.txt").write_text("y")
    assert file_hash(tmp_path / "d") != first
