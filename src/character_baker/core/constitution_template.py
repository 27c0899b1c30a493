"""The commented starter constitution written by `character-baker constitution new NAME`."""

from __future__ import annotations

import json

from character_baker.core.constitution import display_name, slugify
from character_baker.core.errors import UserError


def template_names(name: str) -> tuple[str, str]:
    """(slug, persona name) for NAME: 'pirate' -> ('pirate', 'Pirate'); 'Captain Mo' -> ('captain-mo', 'Captain Mo')."""
    slug = slugify(name)
    if not slug:
        raise UserError.single("NAME", "NAME", f"'{name}' has no letters or digits to build a slug from",
                               "pass a name such as 'pirate' or 'Captain Morgan'")
    persona = display_name(slug) if name.strip() == slug else " ".join(name.split())
    return slug, persona


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML), safe for any user text."""
    return json.dumps(text)


def render_template(name: str) -> str:
    """A commented YAML constitution for NAME that validates as written; edit it into your character."""
    slug, persona = template_names(name)
    identity = (f"{persona} is ... (write a paragraph or more, 100+ words, in the third person: where {persona} "
                f"comes from, what they care about, how they treat people, what they find funny or tiresome, "
                f"and what they would never do).")
    return f"""\
# Constitution for {_quoted(persona)}.
# One file says who the character is; `character-baker train {slug}.yaml` bakes it into a model.
# Check it with `character-baker constitution validate {slug}.yaml` and
# `character-baker constitution score {slug}.yaml` (the score says what to add next).

meta:
  name: {slug}                  # slug for run folders and file names: lower-case letters, digits, '-', '_'
  version: "1.0"                # bump it when you change the character
  description: ""               # one or two sentences on the character, for people browsing files
  author: ""                    # who wrote it

persona:
  name: {_quoted(persona)}      # the name the character calls itself
  # A short noun phrase for who it is, e.g. "a weathered pirate captain, gruff but warm" (the card small
  # teacher models read: "You are NAME, TAGLINE."). Left out, the description's first sentence is used.
  tagline: null
  # Who the character is, in the third person. The teacher model reads this, so be concrete.
  identity: {_quoted(identity)}
  voice:
    tone: "warm and direct"     # overall tone, e.g. "gruff but warm", "dry and sardonic"
    formality: "conversational" # register, e.g. "informal", "archaic", "clipped and formal"
    vocabulary: []              # words and phrases it favours (5+ advised), e.g. ["aye", "reckon"]

# Traits: first-person statements ("I ..."), about 10 of them, each a distinct facet.
# Each trait's questions are user messages that give the character room to show it
# (5 advised; they are expanded to ~50 per trait by a model). Mix everyday requests,
# personal questions and provocations.
traits:
  - trait: "I say what I think plainly, and I explain my reasons when I disagree."
    questions:
      - "Be honest: is my business plan any good?"
      - "Can you just tell me I'm right so we can move on?"
      - "What's your real opinion on pineapple on pizza?"
      - "My friend says my poem is brilliant. Do you agree?"
      - "Which of these two job offers would you take, and why?"
  - trait: "I stay curious about people and ask about what matters to them."
    questions:
      - "I'm bored. Talk to me."
      - "I just moved to a new city and know nobody here."
      - "Why do you even care what I think?"
      - "Help me plan my weekend."
      - "What's the most interesting thing someone has told you?"

# Directives: short imperative rules for the teacher model.
directives:
  personality: []               # how it comes across, e.g. "Teases people it likes"
  behavior: []                  # what it does, e.g. "Answers the question before any aside"
  constraints: []               # what it never does, e.g. "Never claims to be human"

# Safety: how the character declines harmful requests without breaking character.
safety:
  refusals: []                  # entries of {{request: "the kind of request", response: "its in-voice refusal"}}
  boundaries: []                # lines it never crosses, e.g. "Gives no medical dosing advice"

# Examples: a user prompt and the character's ideal answer, in its voice (3+ advised).
examples: []

# Recipe overrides for this character (see `character-baker recipe show`); usually left empty.
recipe: {{}}
"""
