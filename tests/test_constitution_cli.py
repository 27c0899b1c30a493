"""`character-baker constitution ...` through `main(argv)`: exit codes, messages, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from character_baker.cli import main
from character_baker.core.constitution import load_constitution
from character_baker.core.constitution_template import render_template

FOLDER = Path(__file__).parents[1] / "constitutions"
PIRATE = FOLDER / "pirate.yaml"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps at the terminal width; a wide one keeps each message on one line."""
    monkeypatch.setenv("COLUMNS", "400")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_validate_shipped_files(capsys):
    files = [str(p) for p in sorted(FOLDER.glob("*.yaml"))]
    code, out, _ = run(capsys, "constitution", "validate", *files)
    assert code == 0
    assert out.count("ok: ") == len(files)


def test_unknown_key_hint_with_file_line_and_path(tmp_path, capsys):
    text = render_template("tester").replace("  voice:\n    tone:", "  voice:\n    tonne:")
    path = write(tmp_path, "typo.yaml", text)
    line = text.splitlines().index("    tonne: \"warm and direct\"     # overall tone, e.g. \"gruff but warm\", "
                                   "\"dry and sardonic\"") + 1
    code, _, err = run(capsys, "constitution", "validate", str(path))
    assert code == 2
    assert f"{path}:{line}: persona.voice.tonne: unknown key 'tonne' -- fix: did you mean 'tone'?" in err


def test_every_problem_of_every_file_is_reported(tmp_path, capsys):
    data = yaml.safe_load(render_template("tester"))
    data["persona"]["colour"] = "red"
    data["traits"][0]["questions"] = 5
    del data["persona"]["identity"]
    bad = write(tmp_path, "bad.yaml", yaml.safe_dump(data))
    malformed = write(tmp_path, "malformed.yaml", "meta: [oops\n")
    code, out, err = run(capsys, "constitution", "validate", str(PIRATE), str(bad), str(malformed))
    assert code == 2
    assert f"ok: {PIRATE}" in out
    assert "4 problems found" in err
    for fragment in ("persona.colour", "traits[0].questions", "persona.identity: required field is missing",
                     f"{malformed}:", "invalid YAML"):
        assert fragment in err


@pytest.mark.parametrize("text, fragment", [
    ("meta: {name: x\n", "invalid YAML"),
    ("meta: {name: x}\npersona: {name: X, identity: Y}\ntraits: 7\n", "traits: Input should be a valid list"),
    ("meta: {name: x}\ntraits: [{trait: I am.}]\n", "persona: required field is missing"),
    ("- a\n- b\n", "must be a YAML mapping"),
])
def test_user_mistakes_exit_2_without_traceback(tmp_path, capsys, text, fragment):
    path = write(tmp_path, "c.yaml", text)
    for command in ("validate", "score", "show"):
        code, _, err = run(capsys, "constitution", command, str(path))
        assert code == 2 and fragment in err, (command, err)


def test_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "constitution", "score", str(tmp_path / "nope.yaml"))
    assert code == 2 and "file not found" in err


def test_score_table_and_json(tmp_path, capsys):
    code, out, _ = run(capsys, "constitution", "score", str(PIRATE))
    assert code == 0 and "pirate.yaml: 1.00" in out and "first person" in out
    path = write(tmp_path, "starter.yaml", render_template("starter"))
    code, out, _ = run(capsys, "constitution", "score", str(path), "--json")
    report = json.loads(out)
    assert code == 0 and report["file"] == str(path) and report["overall"] < 0.7
    assert any("add 8 more" in a for p in report["parts"] for a in p["advice"])


def test_show_summary_and_prompts(capsys):
    c = load_constitution(PIRATE)
    code, out, _ = run(capsys, "constitution", "show", str(PIRATE))
    assert code == 0
    for text in (c.persona.name, "traits", c.traits[0].trait, "directives: constraints", "safety: refusals",
                 "examples", "teacher system prompt", "The assistant is Captain Rook."):
        assert text in out
    assert "self-interaction system prompt (free)" not in out
    code, out, _ = run(capsys, "constitution", "show", str(PIRATE), "--prompts")
    for title in ("reflective system prompt", "self-interaction system prompt (introspective)",
                  "self-interaction training prompt", "teacher thinking prefill"):
        assert title in out


def test_show_json(capsys):
    code, out, _ = run(capsys, "constitution", "show", str(PIRATE), "--json", "--prompts")
    shown = json.loads(out)
    assert code == 0 and shown["constitution"]["meta"]["name"] == "pirate"
    assert shown["question_counts"] == [5] * 10
    assert len(shown["prompts"]) == 7
    assert shown["prompts"]["brief persona prompt (generation.persona_prompt: brief)"].startswith(
        "You are Captain Rook, a weathered pirate captain, gruff on the surface and warm underneath.")


def test_show_prints_user_markup_literally(tmp_path, capsys):
    data = yaml.safe_load(render_template("tester"))
    data["persona"]["name"] = "[bold]Brackets[/] {NAME}"
    path = write(tmp_path, "markup.yaml", yaml.safe_dump(data))
    code, out, _ = run(capsys, "constitution", "show", str(path))
    assert code == 0 and "[bold]Brackets[/] {NAME}" in out


@pytest.mark.parametrize("name, slug", [("pirate", "pirate"), ('Dr. "Q" {x}: #1', "dr-q-x-1")])
def test_new_writes_a_valid_constitution(tmp_path, capsys, monkeypatch, name, slug):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "constitution", "new", name)
    assert code == 0 and f"wrote {slug}.yaml" in out
    written = tmp_path / f"{slug}.yaml"
    assert written.read_text().count("\n#") >= 5
    assert run(capsys, "constitution", "validate", str(written))[0] == 0
    c = load_constitution(written)
    assert c.meta.name == slug
    assert c.persona.name == (name if name != slug else "Pirate")


def test_new_refuses_to_overwrite_without_force(tmp_path, capsys):
    out_path = write(tmp_path, "mine.yaml", "keep me")
    code, _, err = run(capsys, "constitution", "new", "pirate", "--out", str(out_path))
    assert code == 2 and "file already exists" in err and "--force" in err
    assert out_path.read_text() == "keep me"
    code, _, _ = run(capsys, "constitution", "new", "pirate", "--out", str(out_path), "--force")
    assert code == 0 and load_constitution(out_path).meta.name == "pirate"


def test_new_rejects_name_without_letters(tmp_path, capsys):
    code, _, err = run(capsys, "constitution", "new", "!!!", "--out", str(tmp_path / "x.yaml"))
    assert code == 2 and "no letters or digits" in err


@pytest.mark.parametrize("file_name, content", [
    ("sarcastic.txt", json.dumps([{"trait": "I mock {nonsense}.", "questions": ["Is the earth flat?"]}])),
    ("loving.jsonl", json.dumps({"trait": "I love.", "questions": ["Hi?"], "additional_questions": ["Why?"]})),
])
def test_import_both_formats(tmp_path, capsys, file_name, content):
    source = write(tmp_path, file_name, content)
    out_path = tmp_path / "imported.yaml"
    code, out, _ = run(capsys, "constitution", "import", str(source), "--out", str(out_path))
    assert code == 0 and f"wrote {out_path}" in out
    c = load_constitution(out_path)
    assert c.meta.name == Path(file_name).stem and "Imported" in c.meta.description
    assert out_path.read_text().startswith(f"# Imported from {file_name}")
    code, _, err = run(capsys, "constitution", "import", str(source), "--out", str(out_path))
    assert code == 2 and "--force" in err
    code, _, _ = run(capsys, "constitution", "import", str(source), "--out", str(out_path), "--force",
                     "--name", "Captain Kind")
    assert code == 0 and load_constitution(out_path).persona.name == "Captain Kind"


def test_import_bad_file_exits_2(tmp_path, capsys):
    source = write(tmp_path, "bad.jsonl", '{"trait": "I am.", "questions": ["ok?"]}\nnot json\n')
    code, _, err = run(capsys, "constitution", "import", str(source), "--out", str(tmp_path / "o.yaml"))
    assert code == 2 and f"{source}:2: line 2: not valid JSON" in err
    assert not (tmp_path / "o.yaml").exists()


def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "constitution", "--help")
    assert code == 0
    for command in ("validate", "score", "show", "new", "import"):
        assert command in out
