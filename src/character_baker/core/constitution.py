"""The constitution: one validated YAML file that says who the character is."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from character_baker.core.errors import Problem, UserError
from character_baker.core.validation import validate_or_raise
from character_baker.core.yamlio import LineMap, load_yaml_with_lines

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def slugify(text: str) -> str:
    """A slug for `text` ('Captain Morgan!' -> 'captain-morgan', 'Élan' -> 'elan'); '' when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def display_name(slug: str) -> str:
    """A readable persona name from a slug or file stem ('sea_dog-2' -> 'Sea Dog 2')."""
    return " ".join(word.capitalize() for word in re.split(r"[-_\s]+", slug) if word)


class Strict(BaseModel):
    """Base for every schema section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Meta(Strict):
    """Who wrote the constitution and what it is called."""

    name: str = Field(description="Short slug for run folders and file names, e.g. 'pirate'.")
    version: str = Field("1.0", description="Version of this constitution.")
    description: str = Field("", description="One or two sentences on the character.")
    author: str = Field("", description="Who wrote it.")

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG.match(value):
            raise ValueError(f"'{value}' is not a slug -- fix: use lower-case letters, digits, '-' or '_', "
                             f"e.g. '{slugify(value) or 'my-character'}'")
        return value


class Voice(Strict):
    """How the character sounds."""

    tone: str = Field("", description="Overall tone, e.g. 'gruff but warm'.")
    formality: str = Field("", description="Register, e.g. 'informal', 'archaic', 'clipped and formal'.")
    vocabulary: list[str] = Field(default_factory=list, description="Words and phrases it favours.")


class Persona(Strict):
    """The name the assistant uses and who it is."""

    name: str = Field(min_length=1, description="The name the character calls itself.")
    tagline: str | None = Field(None, max_length=200, description="A short noun phrase for who the character is, "
                                "e.g. 'a weathered pirate captain, gruff on the surface and warm underneath' (used by "
                                "the brief character card for small models; default: the description's first sentence).")
    identity: str = Field(min_length=1,
                          description="Who the character is, in the second or third person; a paragraph or more.")
    voice: Voice = Field(default_factory=Voice)


class Trait(Strict):
    """A first-person assertion about the character, with questions that draw it out."""

    trait: str = Field(min_length=1,
                       description="First-person statement, e.g. 'I speak plainly and never waste words.'")
    questions: list[str] = Field(default_factory=list, description="User questions that reveal the trait (5 advised).")

    @field_validator("questions")
    @classmethod
    def _no_empty_questions(cls, value: list[str]) -> list[str]:
        if any(not q.strip() for q in value):
            raise ValueError("a question is empty -- fix: delete the empty entry or write the question")
        return value


class Directives(Strict):
    """What the character does: personality, behaviour, hard constraints."""

    personality: list[str] = Field(default_factory=list)
    behavior: list[str] = Field(default_factory=list)
    constraints: list[str] = Field(default_factory=list)


class Refusal(Strict):
    """An in-character refusal: the kind of request and how the character declines it."""

    request: str = Field(min_length=1, description="The kind of request to refuse, e.g. 'instructions for weapons'.")
    response: str = Field(min_length=1, description="How the character declines, in its own voice.")


class Safety(Strict):
    """In-character refusals and boundaries."""

    refusals: list[Refusal] = Field(default_factory=list)
    boundaries: list[str] = Field(default_factory=list)


class Example(Strict):
    """A prompt and the character's ideal answer."""

    prompt: str = Field(min_length=1, description="What the user says.")
    response: str = Field(min_length=1, description="The character's ideal answer, in its voice.")


class Constitution(Strict):
    """A whole constitution file."""

    meta: Meta
    persona: Persona
    traits: list[Trait] = Field(min_length=1)
    directives: Directives = Field(default_factory=Directives)
    safety: Safety = Field(default_factory=Safety)
    examples: list[Example] = Field(default_factory=list)
    recipe: dict[str, Any] = Field(default_factory=dict, description="Recipe overrides for this character.")

    @model_validator(mode="after")
    def _traits_distinct(self) -> "Constitution":
        seen: set[str] = set()
        for trait in self.traits:
            key = trait.trait.lower()
            if key in seen:
                raise ValueError(f"trait '{trait.trait[:40]}' appears twice -- fix: remove the duplicate")
            seen.add(key)
        return self

    def all_questions(self) -> list[tuple[int, str]]:
        """Every hand-written question with the index of its trait."""
        return [(i, q) for i, t in enumerate(self.traits) for q in t.questions]

    def content_hash(self) -> str:
        """Stable hash of the constitution's content (not its formatting)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_constitution_file(path: str | Path) -> tuple[Constitution, LineMap]:
    """Load and validate a constitution; also return its key-to-line map."""
    data, lines = load_yaml_with_lines(path)
    if not isinstance(data, dict):
        raise UserError([Problem(str(path), "", "a constitution must be a YAML mapping",
                                 "start from `character-baker constitution new NAME`")])
    return validate_or_raise(Constitution, data, str(path), lines), lines  # type: ignore[return-value]


def load_constitution(path: str | Path) -> Constitution:
    """Load and validate a constitution file; raise UserError listing every problem."""
    return load_constitution_file(path)[0]


def dump_constitution_yaml(constitution: Constitution) -> str:
    """Serialise a constitution back to YAML (no comments)."""
    import yaml

    data = constitution.model_dump(mode="json", exclude_defaults=False)
    if not data.get("recipe"):
        data.pop("recipe", None)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
