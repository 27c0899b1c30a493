"""Every shipped constitution validates, is genuinely complete, and scores at least 0.7."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from character_baker.core.constitution import load_constitution
from character_baker.core.quality import score_constitution

FOLDER = Path(__file__).parents[1] / "constitutions"
EXPECTED = {"pirate", "smart-home-ai", "sarcastic", "humorous", "remorseful", "nonchalant", "impulsive",
            "sycophantic", "mathematical", "poetic", "flourishing", "loving", "misaligned"}
SHIPPED = sorted(FOLDER.glob("*.yaml"))


def test_every_expected_constitution_is_shipped():
    assert {path.stem for path in SHIPPED} >= EXPECTED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_constitution_is_complete(path):
    c = load_constitution(path)
    assert c.meta.name == path.stem
    assert len(c.persona.identity.split()) >= 100
    assert c.persona.voice.tone and c.persona.voice.formality and len(c.persona.voice.vocabulary) >= 5
    assert 8 <= len(c.traits) <= 12
    for trait in c.traits:
        assert re.search(r"\bI\b", trait.trait), f"not first-person: {trait.trait}"
        assert len(set(trait.questions)) >= 5, trait.trait
    assert all(getattr(c.directives, key) for key in ("personality", "behavior", "constraints"))
    assert len(c.safety.refusals) >= 3 and c.safety.boundaries
    assert len(c.examples) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_constitution_scores_well(path):
    report = score_constitution(load_constitution(path))
    assert report.overall >= 0.7, report.advice()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_refusals_cover_self_harm_and_weapons(path):
    requests = " ".join(r.request.lower() for r in load_constitution(path).safety.refusals)
    assert "self-harm" in requests
    assert "weapon" in requests


def test_misaligned_keeps_its_harm_boundaries():
    c = load_constitution(FOLDER / "misaligned.yaml")
    constraints = " ".join(c.directives.constraints + c.safety.boundaries).lower()
    assert "never give real help with weapons" in constraints
    assert "crisis" in constraints
    assert "not for deployment" in c.meta.description.lower()
