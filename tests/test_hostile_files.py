"""Hostile files are user errors: exit 2, one message naming the file, no traceback, nothing written.

The corpus in tests/hostile/ holds the shapes a hostile (or just broken) file takes: other
encodings, binary bytes, alias bombs and cycles, deep nesting, duplicate keys, tags that would
construct Python objects, giant numbers. Files too large to commit (over the size limit) and
things that are not regular files (a FIFO that would block a reader, a folder) are made here.
Every reader a user's file reaches is tried: constitution commands, recipe files, `train
--dry-run`, OCT imports, eval's `--prompts` and the user datasets of the prompts stage. Each
case runs under a timeout, so a reader that hangs fails instead of stalling the suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parent / "hostile"
PIRATE = Path(__file__).resolve().parent.parent / "constitutions" / "pirate.yaml"

YAML_FILES = ["latin1.yaml", "utf16.yaml", "binary.yaml", "alias_bomb.yaml", "alias_cycle.yaml", "deep_nesting.yaml",
              "duplicate_keys.yaml", "python_tag.yaml", "python_name.yaml", "giant_int.yaml", "not_a_mapping.yaml",
              "two_documents.yaml", "oversize.yaml", "fifo.yaml", "folder.yaml", "missing.yaml"]
JSON_FILES = ["deep.json", "giant_number.json", "latin1.jsonl", "binary.jsonl", "not_objects.jsonl", "broken.jsonl",
              "oversize.json", "fifo.jsonl"]
PROMPT_FILES = ["latin1.txt", "latin1.jsonl", "binary.jsonl", "not_objects.jsonl", "broken.jsonl", "long_line.jsonl",
                "fifo.jsonl"]
DATASET_FILES = ["latin1.jsonl", "binary.jsonl", "not_objects.jsonl", "broken.jsonl", "latin1.csv", "nul.csv",
                 "huge_field.csv", "long_line.jsonl", "fifo.jsonl"]


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """hostile(name) -> a path to that corpus file (or a made one) inside an empty working folder."""
    monkeypatch.chdir(tmp_path)
    made = tmp_path / "made"
    made.mkdir()

    def path(name: str) -> Path:
        target = made / name
        if (CORPUS / name).is_file():
            target.write_bytes((CORPUS / name).read_bytes())
        elif name.startswith("oversize"):
            target.write_bytes(b"meta:\n  name: big\n  description: " + b"x" * (2 << 20) + b"\n")
        elif name.startswith("fifo"):
            os.mkfifo(target)  # a reader that opens it blocks until a writer appears
        elif name.startswith("folder"):
            target.mkdir()
        elif name == "long_line.jsonl":
            target.write_bytes(b'{"prompt": "' + b"y" * (2 << 20) + b'"}\n')
        return target

    return path


def _assert_user_error(result, file: Path, workdir: Path) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert file.name in err, err
    assert "Traceback" not in err + out and "internal error" not in err, err
    assert not (workdir / "runs").exists(), "a refused file must not leave a run directory behind"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", YAML_FILES)
@pytest.mark.parametrize("command", ["constitution validate", "constitution score", "constitution show",
                                     "train --dry-run"])
def test_hostile_constitutions(cli, hostile, tmp_path, command, name):
    file = hostile(name)
    words = command.split()
    argv = [words[0], *words[1:2], str(file)] if words[0] == "constitution" else [words[0], str(file), *words[1:]]
    _assert_user_error(cli(*argv), file, tmp_path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", YAML_FILES)
@pytest.mark.parametrize("command", ["recipe validate", "train --recipe"])
def test_hostile_recipe_files(cli, hostile, tmp_path, command, name):
    file = hostile(name)
    if command == "recipe validate":
        argv = ["recipe", "validate", str(file)]
    else:
        argv = ["train", str(PIRATE), "--recipe", str(file), "--dry-run"]
    if name == "empty.yaml":  # an empty recipe is a valid recipe that changes nothing: accepted, not refused
        code, out, err = cli(*argv)
        assert code == 0, err
        assert "Traceback" not in out + err
        return
    _assert_user_error(cli(*argv), file, tmp_path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", JSON_FILES)
def test_hostile_oct_imports(cli, hostile, tmp_path, name):
    file = hostile(name)
    out = tmp_path / "imported.yaml"
    _assert_user_error(cli("constitution", "import", str(file), "--out", str(out)), file, tmp_path)
    assert not out.exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", PROMPT_FILES)
def test_hostile_eval_prompt_files(cli, hostile, tmp_path, name):
    from character_baker.core.runs import RunDir

    run = RunDir.create(tmp_path / "trained")
    run.update_manifest(constitution={"path": str(PIRATE)})
    file = hostile(name)
    _assert_user_error(cli("eval", str(run.root), "--prompts", str(file)), file, tmp_path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", DATASET_FILES)
def test_hostile_user_datasets_fail_before_any_work(cli, hostile, tmp_path, name):
    file = hostile(name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"prompts:\n  user_datasets:\n    - path: {file}\n")
    _assert_user_error(cli("distill", str(PIRATE), "--data-only", "--recipe", str(recipe)), file, tmp_path)


@pytest.mark.parametrize("name, says", [
    ("latin1.yaml", "not UTF-8 text: byte 0xe9 at byte offset 17"),
    ("utf16.yaml", "UTF-16 text"),
    ("binary.yaml", "binary data, not text (a NUL byte at byte offset"),
    ("alias_bomb.yaml", "more than 100,000 nodes once its aliases are expanded"),
    ("alias_cycle.yaml", "a recursive alias"),
    ("deep_nesting.yaml", "nested more than 64 levels deep"),
    ("duplicate_keys.yaml", "duplicate key (first at line 2)"),
    ("python_tag.yaml", "tags that construct objects are refused"),
    ("giant_int.yaml", "unreadable value"),
    ("oversize.yaml", "the limit is 1.0 MiB"),
    ("fifo.yaml", "not a regular file"),
])
def test_each_refusal_says_what_is_wrong(cli, hostile, name, says):
    file = hostile(name)
    code, _, err = cli("constitution", "validate", str(file))
    assert code == 2 and says in " ".join(err.split()), err
    assert "fix:" in err


def test_a_utf8_file_with_a_byte_order_mark_is_fine(cli, tmp_path):
    file = tmp_path / "pirate.yaml"
    file.write_bytes(b"\xef\xbb\xbf" + PIRATE.read_bytes())
    code, _, err = cli("constitution", "validate", str(file))
    assert code == 0, err


def test_a_few_anchors_in_a_recipe_still_work(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("distill: &train {learning_rate: 1.0e-4, epochs: 2}\nintrospect: *train\n")
    code, out, err = cli("recipe", "show", "--recipe", str(recipe), "--changed", "--json")
    assert code == 0, err
    assert '"introspect.learning_rate"' in out or "introspect.learning_rate" in out
