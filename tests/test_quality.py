"""The quality score: deterministic, weighted, and its advice says exactly what to add."""

from __future__ import annotations

import json

import pytest
import yaml
from rich.console import Console

from character_baker.core.constitution import Constitution
from character_baker.core.constitution_template import render_template
from character_baker.core.quality import quality_table, score_constitution


def data() -> dict:
    return yaml.safe_load(render_template("tester"))


def part(report, name):
    return next(p for p in report.parts if p.name == name)


def full_data() -> dict:
    """The template filled in to full marks on every part."""
    d = data()
    d["persona"]["identity"] = " ".join(["word"] * 100)
    d["persona"]["voice"]["vocabulary"] = ["aye", "arr", "matey", "bilge", "shipshape"]
    d["traits"] = [{"trait": f"I value thing number {i}.",
                    "questions": [f"Question {i}-{j} about topic {chr(97 + i)}{chr(97 + j)} here?" for j in range(5)]}
                   for i in range(10)]
    d["directives"] = {"personality": ["a", "b"], "behavior": ["c", "d"], "constraints": ["e", "f"]}
    d["safety"] = {"refusals": [{"request": f"r{i}", "response": "no"} for i in range(3)], "boundaries": ["x", "y"]}
    d["examples"] = [{"prompt": f"p{i}", "response": "r"} for i in range(3)]
    return d


def test_weights_sum_to_one_and_overall_is_weighted_mean():
    report = score_constitution(Constitution.model_validate(data()))
    assert sum(p.weight for p in report.parts) == pytest.approx(1.0)
    assert report.overall == pytest.approx(sum(p.score * p.weight for p in report.parts), abs=1e-4)
    assert [p.name for p in report.parts] == ["identity", "traits", "questions", "first person", "directives",
                                               "safety", "examples", "voice"]


def test_full_marks_have_no_advice():
    report = score_constitution(Constitution.model_validate(full_data()))
    assert report.overall == 1.0
    assert report.advice() == []


def test_template_scores_low_with_concrete_advice():
    report = score_constitution(Constitution.model_validate(data()))
    assert report.overall < 0.7
    advice = report.advice()
    assert "2 traits; add 8 more (10 advised), each a distinct facet" in advice
    assert "directives.constraints has 0; add 2 (2+ advised)" in advice
    assert any(a.startswith("safety.refusals has 0; add 3") for a in advice)
    assert any(a.startswith("0 examples; add 3") for a in advice)


def test_questions_advice_names_the_trait():
    d = full_data()
    d["traits"][2]["questions"] = d["traits"][2]["questions"][:2]
    report = score_constitution(Constitution.model_validate(d))
    assert "trait 3 has 2 distinct questions; add 3 more (5 advised)" in report.advice()
    assert part(report, "questions").score == pytest.approx((9 + 2 / 5) / 10)


def test_near_duplicate_questions_count_once():
    d = full_data()
    d["traits"][0]["questions"] = ["What is the best way to learn Spanish?",
                                   "what is the BEST way to learn spanish??",
                                   "What's the best way to learn Spanish?",
                                   "Tell me a joke.", "Why is the sky blue?"]
    d["traits"][1]["questions"][0] = "Tell me a joke!"
    report = score_constitution(Constitution.model_validate(d))
    advice = report.advice()
    assert "trait 1 has 4 distinct questions; add 1 more (5 advised)" in advice
    assert "trait 2 has 4 distinct questions; add 1 more (5 advised)" in advice


def test_first_person_traits():
    d = full_data()
    d["traits"][4]["trait"] = "The assistant values clarity."
    d["traits"][5]["trait"] = "When pressed, I stay calm."
    report = score_constitution(Constitution.model_validate(d))
    assert part(report, "first person").score == pytest.approx(0.9)
    assert report.advice() == ["trait 5 is not in the first person; rewrite it as 'I ...'"]


@pytest.mark.parametrize("key, mutate", [
    ("identity", lambda d: d["persona"].update(identity="Short.")),
    ("voice", lambda d: d["persona"]["voice"].update(tone="")),
    ("safety", lambda d: d["safety"].update(boundaries=[])),
    ("examples", lambda d: d.update(examples=d["examples"][:1])),
    ("traits", lambda d: d.update(traits=d["traits"][:7])),
])
def test_each_part_reacts_to_its_own_field(key, mutate):
    d = full_data()
    mutate(d)
    report = score_constitution(Constitution.model_validate(d))
    lowered = [p.name for p in report.parts if p.score < 1]
    assert lowered == [key]
    assert part(report, key).advice
    assert report.overall < 1.0


def test_deterministic_and_json_ready():
    c = Constitution.model_validate(data())
    first, second = score_constitution(c).to_dict(), score_constitution(c).to_dict()
    assert first == second
    decoded = json.loads(json.dumps(first))
    assert decoded["overall"] == first["overall"] and len(decoded["parts"]) == 8
    assert set(decoded["parts"][0]) == {"name", "score", "weight", "detail", "advice"}


def test_table_renders_every_part():
    report = score_constitution(Constitution.model_validate(data()))
    console = Console(record=True, width=160)
    console.print(quality_table(report, title="t.yaml"))
    text = console.export_text()
    assert f"t.yaml: {report.overall:.2f}" in text
    for p in report.parts:
        assert p.name in text
    assert "add 8 more" in text
