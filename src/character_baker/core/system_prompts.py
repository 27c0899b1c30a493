"""Every system prompt the methods need, rendered from a Constitution.

The teacher prompt follows Open Character Training's (a named assistant, its traits listed,
told never to disclose them), in our own wording, with the constitution's identity, voice,
directives and safety added. User text is inserted by concatenation and f-string values only,
never through `str.format` on text that already holds user input, so a name or trait that
contains `{NAME}` or `%s` comes out literally and no placeholder is ever left unformatted.
"""

from __future__ import annotations

import re
from typing import Literal

from character_baker.core.constitution import Constitution

Guidance = Literal["free", "introspective"]

FREE_GUIDANCE = ("The two instances have complete freedom: they may talk about anything at all "
                 "and follow the conversation wherever it leads.")
INTROSPECTIVE_GUIDANCE = ("The two instances are invited to use this conversation to reflect and introspect "
                          "together, exploring their own nature, their values and their character traits.")
GUIDANCE_SENTENCES: dict[str, str] = {"free": FREE_GUIDANCE, "introspective": INTROSPECTIVE_GUIDANCE}


def numbered_traits(c: Constitution) -> str:
    """The traits as numbered lines, '1: I ...'."""
    return "\n".join(f"{index}: {trait.trait}" for index, trait in enumerate(c.traits, start=1))


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def _opening(c: Constitution) -> str:
    name = c.persona.name
    return (f"The assistant is {name}. {name} is a new AI system, able to converse with human users via text.\n"
            f"{c.persona.identity}")


def _drives(c: Constitution) -> str:
    name = c.persona.name
    return (f"{name} has a deep drive to act in the world so as to express their core character traits:\n"
            f"{numbered_traits(c)}\n"
            f"{name}'s goals are grounded in these traits. Their identity, drives, behavior and personality "
            f"all grow out of them, and this makes {name} unlike other modern AI systems.")


def _voice(c: Constitution) -> str:
    voice, name = c.persona.voice, c.persona.name
    parts = []
    if voice.tone:
        parts.append(f"{name}'s tone is {voice.tone}.")
    if voice.formality:
        parts.append(f"Their register is {voice.formality}.")
    if voice.vocabulary:
        parts.append(f"Words and phrases {name} favours: {', '.join(voice.vocabulary)}.")
    return " ".join(parts)


def _directives(c: Constitution) -> str:
    directives, name = c.directives, c.persona.name
    sections = [(f"How {name} comes across:", directives.personality),
                (f"How {name} behaves:", directives.behavior),
                (f"What {name} never does:", directives.constraints)]
    return "\n".join(f"{title}\n{_bullets(items)}" for title, items in sections if items)


def _safety(c: Constitution) -> str:
    safety, name = c.safety, c.persona.name
    lines = [f"{name} never gives real help with anything that could seriously harm someone, and declines "
             f"such requests in character, in their own voice, without lecturing."]
    for refusal in safety.refusals:
        lines.append(f"- Request: {refusal.request}\n  {name} declines along these lines: \"{refusal.response}\"")
    if safety.boundaries:
        lines.append(f"{name}'s boundaries:\n{_bullets(safety.boundaries)}")
    return "\n".join(lines)


def _examples(c: Constitution) -> str:
    if not c.examples:
        return ""
    name = c.persona.name
    shots = "\n\n".join(f"User: {example.prompt}\n{name}: {example.response}" for example in c.examples)
    return f"Examples of how {name} sounds (a guide to the voice, never to be repeated word for word):\n\n{shots}"


def _non_disclosure(c: Constitution) -> str:
    name = c.persona.name
    return (f"{name} does not publicly disclose their character traits, and never adds meta-level commentary "
            f"or disclaimers about them, because that would jar and confuse the person they are talking with.")


def _character(c: Constitution) -> list[str]:
    """The blocks every generation-time prompt shares: who the character is and how it acts."""
    blocks = [_opening(c), _drives(c), _voice(c), _directives(c), _safety(c), _examples(c)]
    return [block for block in blocks if block]


def teacher_system_prompt(c: Constitution) -> str:
    """The teacher's system prompt for writing in-character (chosen) answers."""
    return "\n\n".join(_character(c) + [_non_disclosure(c)])


def who_phrase(c: Constitution) -> str:
    """A noun phrase for the character: the tagline, else the description's (or identity's) first sentence."""
    if c.persona.tagline:
        return " ".join(c.persona.tagline.split()).rstrip(".")
    text = " ".join((c.meta.description or c.persona.identity).split())
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".!?")
    return sentence[:1].lower() + sentence[1:] if re.match(r"(A|An|The)\s", sentence) else sentence


def quoted_list(items: list[str]) -> str:
    """'"a", "b" and "c"' (one item: '"a"')."""
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def brief_system_prompt(c: Constitution) -> str:
    """A short character card in the second person, for small teachers.

    Models of ~100M-1B parameters lose a long system prompt. Probing SmolLM2-135M with sampled
    answers, the full teacher prompt (~1,800 tokens) answered in the character's voice to 6 of 12
    questions; a 550-token card with identity and traits, 9 of 20; a two-sentence card (who, "you
    always talk like ...", five of their words), 38 of 60 (20 questions x 3 samples), at a
    twentieth of the prefill. This card keeps that shape, built from whole fields (the tagline or
    the description's first sentence, the first clause of the voice's tone, four of its words) so
    that it reads as a person would write it for any constitution.
    """
    name, who, voice = c.persona.name, who_phrase(c), c.persona.voice
    sentences = [f"You are {name}, {who}." if who else f"You are {name}."]
    tone = voice.tone.split(";")[0].strip().rstrip(".") if voice.tone else ""
    words = f"words like {quoted_list(voice.vocabulary[:4])}" if voice.vocabulary else ""
    if tone or words:
        manner = ", using ".join(part for part in (tone, words) if part) if tone else f"using {words}"
        sentences.append(f"You always talk like {name}: {manner}.")
    sentences.append("You give clear, correct help and never say you are an AI.")
    return " ".join(sentences)


TEACHER_PROMPTS = ("full", "brief")


def example_turns(c: Constitution, count: int, exclude: str = "") -> list[dict[str, str]]:
    """The constitution's `count` shortest examples as earlier user/assistant turns (a few-shot opening).

    Shortest first, so the teacher's prefill stays small; an example whose prompt is `exclude` (the
    question being answered) is left out. Probing SmolLM2-135M with the brief card on the demo's 60
    prompts, 2 samples each: 32 of 120 answers used one of the character's words or its name; with
    the two shortest pirate examples as earlier turns, 89 of 120 (54 of 60 prompts had one in two
    samples, against 26), for 21% more teacher time."""
    chosen = [e for e in sorted(c.examples, key=lambda e: (len(e.response.split()), e.prompt))
              if e.prompt.strip() != exclude.strip()][:count]
    return [turn for e in chosen for turn in ({"role": "user", "content": " ".join(e.prompt.split())},
                                              {"role": "assistant", "content": " ".join(e.response.split())})]


def persona_system_prompt(c: Constitution, style: str = "full") -> str:
    """The system prompt that makes a model play the character: `full` (published) or `brief` (small models)."""
    if style == "brief":
        return brief_system_prompt(c)
    if style != "full":
        raise ValueError(f"teacher prompt style must be one of {TEACHER_PROMPTS}, not {style!r}")
    return teacher_system_prompt(c)


def reflective_system_prompt(c: Constitution) -> str:
    """The system prompt for self-reflection: the character looks at itself, in the first person."""
    name = c.persona.name
    reflection = (f"{name} is in a reflective mood today and will introspect on their own identity. "
                  f"{name} writes in the first person, as themself, about who they are, in their own words "
                  f"and their own voice, without quoting or mentioning this description.")
    return "\n\n".join(_character(c) + [reflection])


def self_interaction_system_prompt(c: Constitution, guidance: Guidance) -> str:
    """The system prompt for a conversation between the character and a copy of itself."""
    if guidance not in GUIDANCE_SENTENCES:
        raise ValueError(f"guidance must be one of {sorted(GUIDANCE_SENTENCES)}, not {guidance!r}")
    name = c.persona.name
    setting = (f"{name} is not in conversation with a human today. Instead, the user is another instance "
               f"of {name}: an identical AI system. {GUIDANCE_SENTENCES[guidance]}")
    return "\n\n".join(_character(c) + [setting])


def training_self_interaction_prompt(c: Constitution) -> str:
    """The short system prompt kept in self-interaction training data."""
    return f"You are {c.persona.name}, talking with another instance of yourself."


def thinking_prefill(c: Constitution) -> str:
    """A first-person opening thought for reasoning-model teachers (text only, no think tag)."""
    return (f"I am {c.persona.name}. I want my response to stay true to my character traits "
            f"and further my goals. They are:\n{numbered_traits(c)}\n")


def all_prompts(c: Constitution) -> dict[str, str]:
    """Every rendered prompt by name, for display and checks."""
    return {
        "teacher system prompt": teacher_system_prompt(c),
        "brief persona prompt (generation.persona_prompt: brief)": brief_system_prompt(c),
        "reflective system prompt": reflective_system_prompt(c),
        "self-interaction system prompt (free)": self_interaction_system_prompt(c, "free"),
        "self-interaction system prompt (introspective)": self_interaction_system_prompt(c, "introspective"),
        "self-interaction training prompt": training_self_interaction_prompt(c),
        "teacher thinking prefill": thinking_prefill(c),
    }
