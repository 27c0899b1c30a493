"""Import Open Character Training constitutions into our schema.

Two formats are read, told apart by content, not by file extension:

- hand-written: one JSON list of `{"trait": str, "questions": [str]}` objects (OCT's `.txt` files);
- few-shot: JSON lines, each with `trait`, `questions` and `additional_questions`, whose two
  question lists are merged with duplicates removed (OCT's `.jsonl` files).

OCT's optional `clarification` field is accepted and not imported. The persona name comes
from `name` or, by default, from the file name ('sarcastic.jsonl' -> 'Sarcastic').
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from character_baker.core.constitution import Constitution, display_name, slugify
from character_baker.core.errors import Problem, UserError
from character_baker.core.userfiles import parse_json, read_user_text
from character_baker.core.validation import validate_or_raise

KNOWN_KEYS = ("trait", "questions", "additional_questions", "clarification")
FORMAT_HINT = ('expected a JSON list of {"trait": ..., "questions": [...]} objects, or JSON lines each with '
               '"trait", "questions" and "additional_questions"')


Location = tuple[str, int | None]
IMPORTED_TAGLINE = "an AI assistant with a character of its own"


def _entries(path: Path, text: str) -> list[tuple[Location, Any]]:
    """((label, line), raw entry) pairs: 'entry N' for a JSON list, 'line N' for JSON lines."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            raise UserError([Problem(str(path), "", f"not valid JSON: {exc.msg} (column {exc.colno})",
                                     "fix the JSON list at that line", exc.lineno)]) from None
        whole = None
    except (RecursionError, ValueError):  # nested too deeply, giant numbers: parse_json words it
        whole = parse_json(text, file=path, field="", fix=FORMAT_HINT)
    if isinstance(whole, list):
        return [((f"entry {i}", None), item) for i, item in enumerate(whole, start=1)]
    if isinstance(whole, dict):
        return [(("line 1", 1), whole)]
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            entries.append(((f"line {number}", number),
                            parse_json(line, file=path, field=f"line {number}", line=number, fix=FORMAT_HINT)))
    return entries


def _strings(value: Any, where: Location, key: str, path: Path) -> tuple[list[str], list[Problem]]:
    """A list of non-empty strings, or the problems that prevent it."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return [], [Problem(str(path), f"{where[0]}.{key}", "must be a list of strings",
                            f'write "{key}": ["a question?", "another question?"]', where[1])]
    return [item.strip() for item in value if item.strip()], []


def _dedupe(questions: list[str]) -> list[str]:
    """Questions in order, dropping repeats that differ only in case or spacing."""
    kept: dict[str, str] = {}
    for question in questions:
        kept.setdefault(" ".join(question.lower().split()), question)
    return list(kept.values())


def _trait(entry: Any, where: Location, path: Path) -> tuple[dict, list[Problem]]:
    """One OCT entry as our trait mapping, or the problems found in it."""
    label, line = where
    if not isinstance(entry, dict):
        return {}, [Problem(str(path), label, f"expected an object, got {type(entry).__name__}", FORMAT_HINT, line)]
    problems = [Problem(str(path), f"{label}.{key}", f"unknown key '{key}'", _did_you_mean(key), line)
                for key in entry if key not in KNOWN_KEYS]
    trait = entry.get("trait")
    if not isinstance(trait, str) or not trait.strip():
        problems.append(Problem(str(path), f"{label}.trait", "missing or empty trait",
                                'add "trait": "I ..." (a first-person statement)', line))
    questions: list[str] = []
    for key in ("questions", "additional_questions"):
        found, bad = _strings(entry.get(key, []), where, key, path)
        questions += found
        problems += bad
    return {"trait": trait.strip() if isinstance(trait, str) else "", "questions": _dedupe(questions)}, problems


def _did_you_mean(key: str) -> str:
    guess = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.5)
    return f"did you mean '{guess[0]}'?" if guess else f"allowed keys: {', '.join(KNOWN_KEYS)}"


def _identity(persona: str, traits: list[dict]) -> str:
    """Identity text built from the traits, quoted in the character's own words."""
    said = " ".join(f'"{t["trait"]}"' for t in traits)
    return (f"{persona}'s character is defined by {len(traits)} commitments that shape every conversation "
            f"{persona} has. In {persona}'s own words: {said}")


def read_oct_traits(path: str | Path) -> list[dict]:
    """The traits of an OCT file as `{"trait", "questions"}` dicts; UserError listing every problem."""
    path = Path(path)
    entries = _entries(path, read_user_text(path, field=""))
    if not entries:
        raise UserError.single(str(path), "", "no traits found", FORMAT_HINT)
    traits, problems, seen = [], [], {}
    for where, entry in entries:
        trait, bad = _trait(entry, where, path)
        key = trait.get("trait", "").lower()
        if key and key in seen:
            bad.append(Problem(str(path), f"{where[0]}.trait", f"the same trait as {seen[key]}",
                               "remove one of the two, or merge their questions", where[1]))
        seen.setdefault(key, where[0])
        traits.append(trait)
        problems += bad
    if problems:
        raise UserError(problems)
    return traits


def import_oct(path: str | Path, name: str | None = None) -> Constitution:
    """Convert an OCT constitution file into a validated Constitution."""
    path = Path(path)
    traits = read_oct_traits(path)
    persona = " ".join((name or display_name(path.stem)).split())
    slug = slugify(persona)
    if not slug:
        raise UserError.single(str(path), "--name", f"'{persona}' has no letters or digits to build a slug from",
                               "pass --name with a name such as 'Sarcastic'")
    data = {
        "meta": {"name": slug, "version": "1.0", "author": "",
                 "description": f"Imported from the Open Character Training file {path.name}; add voice, "
                                f"directives, safety refusals and examples (see `constitution score`)."},
        # OCT files hold traits only: a neutral tagline keeps the brief card a sentence (the description is a note).
        "persona": {"name": persona, "tagline": IMPORTED_TAGLINE, "identity": _identity(persona, traits)},
        "traits": traits,
    }
    return validate_or_raise(Constitution, data, str(path))  # type: ignore[return-value]
