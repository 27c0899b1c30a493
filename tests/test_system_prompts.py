"""System prompts: name and traits reach them, guidance sentences reach them, no placeholder leaks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from character_baker.core.constitution import Constitution, load_constitution
from character_baker.core.constitution_template import render_template
from character_baker.core.system_prompts import (FREE_GUIDANCE, INTROSPECTIVE_GUIDANCE, all_prompts,
                                                 brief_system_prompt, persona_system_prompt, who_phrase,
                                                 reflective_system_prompt, self_interaction_system_prompt,
                                                 teacher_system_prompt, thinking_prefill,
                                                 training_self_interaction_prompt)

SHIPPED = sorted((Path(__file__).parents[1] / "constitutions").glob("*.yaml"))
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}|\{\}|%\(?[a-z_]*\)?s|\$\{?[A-Za-z_]+\}?")


def tricky_constitution() -> Constitution:
    """User text full of things a formatter would eat: braces, {NAME}, %s, $name."""
    data = yaml.safe_load(render_template("tricky"))
    data["persona"]["name"] = "{NAME} the %s Bot"
    data["persona"]["identity"] = "Loves {curly} braces, {} pairs, %(who)s and ${name}; never {traits}."
    data["persona"]["voice"]["vocabulary"] = ["{name}", "100%s"]
    data["traits"][0]["trait"] = "I write {traits} and {NAME} literally, 50% of the time %s."
    data["directives"]["behavior"] = ["Answer {question} first."]
    data["safety"]["refusals"] = [{"request": "{bad} things", "response": "No {way}, %d times no."}]
    data["examples"] = [{"prompt": "Say {hi}", "response": "{hi} yourself"}]
    return Constitution.model_validate(data)


def user_strings(c: Constitution) -> list[str]:
    """Every piece of user text that may legitimately appear in a prompt."""
    strings = [c.meta.description, who_phrase(c), c.persona.tagline or "", c.persona.name, c.persona.identity, c.persona.voice.tone, c.persona.voice.formality,
               *c.persona.voice.vocabulary, *(t.trait for t in c.traits), *c.directives.personality,
               *c.directives.behavior, *c.directives.constraints, *c.safety.boundaries]
    strings += [s for r in c.safety.refusals for s in (r.request, r.response)]
    strings += [s for e in c.examples for s in (e.prompt, e.response)]
    return sorted((s for s in strings if s), key=len, reverse=True)


def assert_no_placeholder(c: Constitution, prompt: str) -> None:
    """After removing every user string, nothing placeholder-like may remain."""
    rest = prompt
    for text in user_strings(c):
        rest = rest.replace(text, "")
    assert not PLACEHOLDER.search(rest), PLACEHOLDER.search(rest).group(0)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_prompts_are_complete_and_clean(path):
    c = load_constitution(path)
    for name, prompt in all_prompts(c).items():
        assert c.persona.name in prompt, name
        assert not PLACEHOLDER.search(prompt), (name, PLACEHOLDER.search(prompt).group(0))
    for prompt in (teacher_system_prompt(c), reflective_system_prompt(c), thinking_prefill(c),
                   self_interaction_system_prompt(c, "free"), self_interaction_system_prompt(c, "introspective")):
        for trait in c.traits:
            assert trait.trait in prompt


def test_tricky_user_text_survives_literally_and_nothing_leaks():
    c = tricky_constitution()
    for name, prompt in all_prompts(c).items():
        assert "{NAME} the %s Bot" in prompt, name
        assert_no_placeholder(c, prompt)
    teacher = teacher_system_prompt(c)
    for text in ("{curly} braces, {} pairs, %(who)s and ${name}", "I write {traits} and {NAME} literally",
                 "Answer {question} first.", "No {way}, %d times no.", "{hi} yourself", "100%s"):
        assert text in teacher


def test_placeholder_check_would_catch_a_leak():
    c = tricky_constitution()
    with pytest.raises(AssertionError):
        assert_no_placeholder(c, teacher_system_prompt(c) + " {NAME}")


def test_teacher_prompt_follows_open_character_training():
    c = load_constitution(SHIPPED[0])
    prompt = teacher_system_prompt(c)
    name = c.persona.name
    assert prompt.startswith(f"The assistant is {name}. {name} is a new AI system")
    assert c.persona.identity in prompt
    assert "1: " + c.traits[0].trait in prompt and f"{len(c.traits)}: {c.traits[-1].trait}" in prompt
    assert "does not publicly disclose their character traits" in prompt
    assert "meta-level commentary or disclaimers" in prompt
    for refusal in c.safety.refusals:
        assert refusal.response in prompt
    for rule in c.directives.constraints + c.safety.boundaries:
        assert rule in prompt
    assert c.persona.voice.tone in prompt and c.persona.voice.vocabulary[0] in prompt


def test_empty_sections_leave_no_dangling_headers():
    c = Constitution.model_validate(yaml.safe_load(render_template("bare")))
    prompt = teacher_system_prompt(c)
    assert "behaves:" not in prompt and "boundaries:" not in prompt and "Examples of" not in prompt
    assert "declines such requests in character" in prompt
    assert "\n\n\n" not in prompt


def test_reflective_prompt_is_first_person_reflection():
    c = load_constitution(SHIPPED[0])
    prompt = reflective_system_prompt(c)
    assert "reflective mood" in prompt and "in the first person, as themself" in prompt
    assert "does not publicly disclose" not in prompt


@pytest.mark.parametrize("guidance, present, absent", [("free", FREE_GUIDANCE, INTROSPECTIVE_GUIDANCE),
                                                       ("introspective", INTROSPECTIVE_GUIDANCE, FREE_GUIDANCE)])
def test_guidance_sentence_reaches_self_interaction_prompt(guidance, present, absent):
    c = load_constitution(SHIPPED[0])
    prompt = self_interaction_system_prompt(c, guidance)
    assert present in prompt and absent not in prompt
    assert f"the user is another instance of {c.persona.name}" in prompt


def test_unknown_guidance_is_rejected():
    with pytest.raises(ValueError, match="free"):
        self_interaction_system_prompt(load_constitution(SHIPPED[0]), "chatty")  # type: ignore[arg-type]


def test_training_prompt_and_prefill():
    c = tricky_constitution()
    expected = "You are {NAME} the %s Bot, talking with another instance of yourself."
    assert training_self_interaction_prompt(c) == expected
    prefill = thinking_prefill(c)
    assert prefill.startswith("I am {NAME} the %s Bot. I want")
    assert "<think>" not in prefill


def test_brief_card_is_short_and_names_who_how_and_the_words():
    c = load_constitution("constitutions/pirate.yaml")
    card = brief_system_prompt(c)
    assert card == ('You are Captain Rook, a weathered pirate captain, gruff on the surface and warm underneath. '
                    'You always talk like Captain Rook: gruff but warm, weathered, dry humour under a rough surface, '
                    'using words like "arr", "aye", "matey" and "landlubber". '
                    'You give clear, correct help and never say you are an AI.')
    assert len(card) * 10 < len(teacher_system_prompt(c))  # the point: a tenth of the published prompt or less


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_brief_card_reads_as_written_sentences(path):
    c = load_constitution(path)
    card = brief_system_prompt(c)
    sentences = re.split(r"(?<=\.) (?=[A-Z])", card)
    assert len(sentences) == 3 and all(s.endswith(".") for s in sentences), card
    assert sentences[0] == f"You are {c.persona.name}, {c.persona.tagline}."
    assert len(c.persona.tagline.split()) >= 4 and re.match(r"(a|an) ", c.persona.tagline), c.persona.tagline
    assert sentences[1].startswith(f"You always talk like {c.persona.name}: ") and "using words like" in sentences[1]
    assert not re.search(r"\b(a|an|the)\.|\(\)|\.\.|  |,\.|\s[,.]", card), card


def test_without_a_tagline_the_card_uses_the_whole_first_sentence_of_the_description():
    c = load_constitution("constitutions/sarcastic.yaml")
    plain = c.model_copy(update={"persona": c.persona.model_copy(update={"tagline": None})})
    assert brief_system_prompt(plain).startswith(
        "You are Vex, a dry, quick-witted assistant who answers with sarcasm, punctures nonsense and deflects silly "
        "questions, while still giving genuinely correct and useful help. You always talk like Vex: dry, deadpan")


def test_brief_card_falls_back_to_the_identity_and_keeps_user_text_literal():
    c = tricky_constitution()
    card = brief_system_prompt(c)
    assert "{NAME} the %s Bot" in card and "100%s" in card
    bare = c.model_copy(update={"meta": c.meta.model_copy(update={"description": ""})})
    assert brief_system_prompt(bare).startswith("You are {NAME} the %s Bot, Loves {curly} braces")
    no_words = bare.model_copy(update={"persona": bare.persona.model_copy(
        update={"voice": bare.persona.voice.model_copy(update={"vocabulary": []})})})
    assert "()" not in brief_system_prompt(no_words)


def test_persona_prompt_style_picks_the_prompt():
    c = load_constitution("constitutions/pirate.yaml")
    assert persona_system_prompt(c, "full") == teacher_system_prompt(c)
    assert persona_system_prompt(c, "brief") == brief_system_prompt(c)
    with pytest.raises(ValueError, match="brief"):
        persona_system_prompt(c, "short")
