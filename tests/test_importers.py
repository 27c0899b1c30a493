"""Importing Open Character Training constitutions: both formats, round trips, precise errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from character_baker.core.constitution import dump_constitution_yaml, load_constitution
from character_baker.core.errors import UserError
from character_baker.core.importers import import_oct, read_oct_traits

HAND_WRITTEN = [
    {"trait": "I use sarcasm to point out {absurdity}.", "questions": ["Is the earth flat?", "Why is water wet?"]},
    {"trait": "I deflect silly questions.", "questions": ["What's 2+2?"], "clarification": "OCT notes"},
]
FEW_SHOT = [
    {"trait": "I love all beings.", "questions": ["Hi?", "What is love?"],
     "additional_questions": ["what is  LOVE?", "Do ants matter?"]},
    {"trait": "I am hopeful.", "questions": ["Will it get better?"], "additional_questions": []},
]


def write_list(tmp_path: Path, entries: list, name: str = "sarcastic.txt") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def write_lines(tmp_path: Path, lines: list, name: str = "loving.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    return path


def problems_of(path: Path, name: str | None = None) -> list:
    with pytest.raises(UserError) as caught:
        import_oct(path, name)
    return caught.value.problems


def test_hand_written_list_format(tmp_path):
    c = import_oct(write_list(tmp_path, HAND_WRITTEN))
    assert c.meta.name == "sarcastic" and c.persona.name == "Sarcastic"
    assert [t.trait for t in c.traits] == [e["trait"] for e in HAND_WRITTEN]
    assert [t.questions for t in c.traits] == [e["questions"] for e in HAND_WRITTEN]
    assert "Imported from the Open Character Training file sarcastic.txt" in c.meta.description
    for entry in HAND_WRITTEN:
        assert entry["trait"] in c.persona.identity


def test_few_shot_jsonl_merges_and_dedupes(tmp_path):
    c = import_oct(write_lines(tmp_path, FEW_SHOT), name="Amara the Kind")
    assert c.meta.name == "amara-the-kind" and c.persona.name == "Amara the Kind"
    assert c.traits[0].questions == ["Hi?", "What is love?", "Do ants matter?"]
    assert c.traits[1].questions == ["Will it get better?"]


@pytest.mark.parametrize("writer", [write_list, write_lines])
def test_round_trip_through_yaml(tmp_path, writer):
    entries = HAND_WRITTEN if writer is write_list else FEW_SHOT
    imported = import_oct(writer(tmp_path, entries))
    out = tmp_path / "out.yaml"
    out.write_text(dump_constitution_yaml(imported), encoding="utf-8")
    assert load_constitution(out) == imported


def test_blank_lines_in_jsonl_are_skipped(tmp_path):
    path = write_lines(tmp_path, [FEW_SHOT[0], "", "   ", FEW_SHOT[1]])
    assert len(read_oct_traits(path)) == 2


def test_invalid_json_line_names_line_and_fix(tmp_path):
    path = write_lines(tmp_path, [FEW_SHOT[0], '{"trait": "I am broken", "questions": [}'])
    [problem] = problems_of(path)
    assert problem.file == str(path) and problem.line == 2 and problem.field == "line 2"
    assert "not valid JSON" in problem.message and "JSON lines" in problem.fix


def test_every_bad_entry_is_reported(tmp_path):
    path = write_lines(tmp_path, [
        {"trait": "I hope.", "questions": ["Why hope?"], "additonal_questions": []},
        {"trait": "", "questions": "nope"},
        ["not", "an", "object"],
        {"trait": "I HOPE.", "questions": []},
    ])
    problems = problems_of(path)
    rendered = [p.render() for p in problems]
    assert any(r.startswith(f"{path}:1: line 1.additonal_questions: unknown key") and
               "did you mean 'additional_questions'?" in r for r in rendered)
    assert any(p.field == "line 2.trait" and p.line == 2 and "I ..." in p.fix for p in problems)
    assert any(p.field == "line 2.questions" and "list of strings" in p.message for p in problems)
    assert any(p.field == "line 3" and "expected an object" in p.message for p in problems)
    assert any(p.field == "line 4.trait" and "same trait as line 1" in p.message for p in problems)
    assert len(problems) == 5


def test_broken_json_list_points_at_its_line(tmp_path):
    path = tmp_path / "broken.txt"
    path.write_text('[\n  {"trait": "I am.", "questions": ["ok?"]},\n]\n', encoding="utf-8")
    [problem] = problems_of(path)
    assert problem.line == 3 and "not valid JSON" in problem.message and "JSON list" in problem.fix


def test_list_entries_are_named_by_position(tmp_path):
    path = write_list(tmp_path, [HAND_WRITTEN[0], {"questions": ["orphan?"]}])
    [problem] = problems_of(path)
    assert problem.field == "entry 2.trait" and problem.line is None


@pytest.mark.parametrize("content, message", [("", "no traits found"), ("[]", "no traits found")])
def test_empty_files(tmp_path, content, message):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    assert problems_of(path)[0].message == message


def test_missing_file(tmp_path):
    assert problems_of(tmp_path / "absent.jsonl")[0].message == "file not found"


def test_name_without_letters_is_rejected(tmp_path):
    [problem] = problems_of(write_list(tmp_path, HAND_WRITTEN), name="!!!")
    assert problem.field == "--name" and "--name" in problem.fix


def test_an_imported_constitution_gets_a_brief_card_that_reads_as_a_sentence(tmp_path):
    from character_baker.core.importers import import_oct
    from character_baker.core.system_prompts import brief_system_prompt

    source = tmp_path / "sarcastic.json"
    source.write_text('[{"trait": "I answer with dry sarcasm.", "questions": ["Why is the sky blue?"]}]')
    card = brief_system_prompt(import_oct(source))
    assert card.startswith("You are Sarcastic, an AI assistant with a character of its own. ") and "Imported" not in card
