"""The constitution schema: every user mistake becomes a Problem with file, line, field path and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from character_baker.core.constitution import (Constitution, display_name, dump_constitution_yaml,
                                               load_constitution, load_constitution_file, slugify)
from character_baker.core.constitution_template import render_template
from character_baker.core.errors import UserError


def valid_data() -> dict:
    """A valid constitution as data (the `constitution new` template)."""
    return yaml.safe_load(render_template("tester"))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list:
    with pytest.raises(UserError) as caught:
        load_constitution(path)
    return caught.value.problems


def test_template_data_is_valid(tmp_path):
    constitution = load_constitution(write(tmp_path, yaml.safe_dump(valid_data())))
    assert constitution.meta.name == "tester"
    assert constitution.persona.name == "Tester"
    assert len(constitution.all_questions()) == sum(len(t.questions) for t in constitution.traits)


def test_unknown_key_names_file_line_path_and_guess(tmp_path):
    text = render_template("tester").replace('  name: "Tester"', '  nmae: "Tester"')
    path = write(tmp_path, text)
    problems = problems_of(path)
    unknown = [p for p in problems if p.field == "persona.nmae"]
    assert len(unknown) == 1
    expected_line = text.splitlines().index(next(l for l in text.splitlines() if l.startswith("  nmae:"))) + 1
    assert unknown[0].line == expected_line
    assert unknown[0].file == str(path)
    assert "did you mean 'name'?" in unknown[0].fix
    rendered = unknown[0].render()
    assert rendered.startswith(f"{path}:{expected_line}: persona.nmae: unknown key 'nmae'")


def test_several_problems_reported_at_once(tmp_path):
    data = valid_data()
    data["persona"]["colour"] = "red"          # unknown key
    del data["persona"]["identity"]            # missing field
    data["traits"][0]["questions"] = "oops"    # wrong type
    data["meta"]["name"] = "Not A Slug"        # bad value
    problems = problems_of(write(tmp_path, yaml.safe_dump(data)))
    fields = {p.field for p in problems}
    assert {"persona.colour", "persona.identity", "traits[0].questions", "meta.name"} <= fields
    assert all(p.line is not None for p in problems)


@pytest.mark.parametrize("mutate, field, fix_part", [
    (lambda d: d.update(traits="be nice"), "traits", "correct the value"),
    (lambda d: d.update(traits=[]), "traits", "add or remove entries"),
    (lambda d: d["persona"].update(name=""), "persona.name", "correct the value"),
    (lambda d: d["traits"][1].update(questions=["ok?", "  "]), "traits[1].questions", "delete the empty entry"),
    (lambda d: d["safety"].update(refusals=[{"request": "x"}]), "safety.refusals[0].response", "add 'response'"),
    (lambda d: d.pop("meta"), "meta", "add 'meta'"),
    (lambda d: d["meta"].update(name="Sea Dog!"), "meta.name", "e.g. 'sea-dog'"),
])
def test_each_mistake_has_its_field_and_fix(tmp_path, mutate, field, fix_part):
    data = valid_data()
    mutate(data)
    problems = problems_of(write(tmp_path, yaml.safe_dump(data)))
    match = [p for p in problems if p.field == field]
    assert match, [p.render() for p in problems]
    assert fix_part in match[0].fix


def test_duplicate_traits_rejected(tmp_path):
    data = valid_data()
    data["traits"].append(dict(data["traits"][0], trait=data["traits"][0]["trait"].upper()))
    problems = problems_of(write(tmp_path, yaml.safe_dump(data)))
    assert any("appears twice" in p.message and "remove the duplicate" in p.fix for p in problems)


def test_malformed_yaml_points_at_line(tmp_path):
    path = write(tmp_path, "meta:\n  name: x\npersona: [unclosed\n  name: y\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert "invalid YAML" in problems[0].message and problems[0].line is not None


@pytest.mark.parametrize("text", ["- just\n- a list\n", "", "42\n"])
def test_not_a_mapping(tmp_path, text):
    problems = problems_of(write(tmp_path, text))
    assert "must be a YAML mapping" in problems[0].message
    assert "constitution new" in problems[0].fix


def test_missing_file(tmp_path):
    problems = problems_of(tmp_path / "nope.yaml")
    assert problems[0].message == "file not found"


def test_dump_round_trips(tmp_path):
    constitution = load_constitution(Path(__file__).parents[1] / "constitutions" / "pirate.yaml")
    again = load_constitution(write(tmp_path, dump_constitution_yaml(constitution)))
    assert again == constitution
    assert again.content_hash() == constitution.content_hash()


def test_line_map_covers_nested_keys(tmp_path):
    _, lines = load_constitution_file(write(tmp_path, render_template("tester")))
    assert ("traits", 1, "questions") in lines
    assert ("persona", "voice", "tone") in lines


def test_version_number_becomes_text():
    data = valid_data()
    data["meta"]["version"] = 2
    assert Constitution.model_validate(data).meta.version == "2"


@pytest.mark.parametrize("text, slug", [("Captain Morgan!", "captain-morgan"), ("pirate", "pirate"),
                                        ("  Élan 2 ", "elan-2"), ("!!!", "")])
def test_slugify(text, slug):
    assert slugify(text) == slug


def test_display_name():
    assert display_name("sea_dog-2") == "Sea Dog 2"
    assert display_name("smart-home-ai") == "Smart Home Ai"
