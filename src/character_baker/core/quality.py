"""How complete and well-formed a constitution is: a 0..1 score, a breakdown, and advice.

The overall score is the weighted mean of eight parts, each 0..1 and deterministic:

| part            | weight | full marks when                                                      |
|-----------------|--------|----------------------------------------------------------------------|
| identity        | 0.15   | the identity paragraph has >= 100 words                              |
| traits          | 0.10   | >= 10 traits (the Open Character Training constitutions have ~10)    |
| questions       | 0.20   | every trait has >= 5 distinct questions; a question whose word set   |
|                 |        | overlaps an earlier one's by >= 80% (Jaccard) counts once, across    |
|                 |        | the whole file; the mean of min(1, n/5) over traits                  |
| first person    | 0.05   | every trait is a first-person statement (it says "I")                |
| directives      | 0.15   | personality, behavior and constraints each have >= 2 entries         |
| safety          | 0.15   | >= 3 in-character refusals (70%) and >= 2 boundaries (30%)           |
| examples        | 0.10   | >= 3 prompt/response examples                                        |
| voice           | 0.10   | tone and formality are set and >= 5 vocabulary entries (1/3 each)    |

Every part below full marks carries concrete advice that says what to add.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

from character_baker.core.constitution import Constitution
from character_baker.core.text import words as word_set

if TYPE_CHECKING:
    from rich.table import Table

IDENTITY_WORDS = 100
TRAITS = 10
QUESTIONS_PER_TRAIT = 5
DIRECTIVES_PER_SECTION = 2
REFUSALS = 3
BOUNDARIES = 2
EXAMPLES = 3
VOCABULARY = 5
NEAR_DUPLICATE = 0.8  # word-set Jaccard similarity at which two questions count as one
FIRST_PERSON = re.compile(r"\bI\b")  # "I", "I'm", "When I ...": the character speaks as itself


@dataclass
class PartScore:
    """One scored part: its score (0..1), its weight, what was measured and how to improve it."""

    name: str
    score: float
    weight: float
    detail: str
    advice: list[str] = field(default_factory=list)


@dataclass
class QualityReport:
    """The overall score (0..1, weighted mean of the parts) and the per-part breakdown."""

    overall: float
    parts: list[PartScore]

    def advice(self) -> list[str]:
        """Every piece of advice, part by part."""
        return [line for part in self.parts for line in part.advice]

    def to_dict(self) -> dict:
        """A JSON-ready form."""
        return {"overall": self.overall, "parts": [asdict(part) for part in self.parts]}


def _ratio(have: int, want: int) -> float:
    return min(1.0, have / want)


def _more(have: int, want: int) -> int:
    return max(0, want - have)


def _identity(c: Constitution) -> PartScore:
    words = len(c.persona.identity.split())
    advice = ([f"persona.identity has {words} words; write about {_more(words, IDENTITY_WORDS)} more "
               f"({IDENTITY_WORDS}+ advised): background, motives, what it cares about, how it treats people"]
              if words < IDENTITY_WORDS else [])
    return PartScore("identity", _ratio(words, IDENTITY_WORDS), 0.15, f"{words} words", advice)


def _traits(c: Constitution) -> PartScore:
    count = len(c.traits)
    advice = ([f"{count} traits; add {_more(count, TRAITS)} more ({TRAITS} advised), each a distinct facet"]
              if count < TRAITS else [])
    return PartScore("traits", _ratio(count, TRAITS), 0.10, f"{count} traits", advice)


def _words(text: str) -> frozenset[str]:
    return frozenset(word_set(text))


def _near_duplicate(words: frozenset[str], seen: list[frozenset[str]]) -> bool:
    """True when `words` overlaps an earlier question's words by NEAR_DUPLICATE (Jaccard) or more."""
    return any(len(words & other) >= NEAR_DUPLICATE * len(words | other) for other in seen)


def _distinct_questions(c: Constitution) -> list[int]:
    """Per trait, how many of its questions are not near-duplicates of an earlier question in the file."""
    seen: list[frozenset[str]] = []
    counts = []
    for trait in c.traits:
        fresh = 0
        for question in trait.questions:
            words = _words(question)
            if not _near_duplicate(words, seen):
                fresh += 1
            seen.append(words)
        counts.append(fresh)
    return counts


def _questions(c: Constitution) -> PartScore:
    counts = _distinct_questions(c)
    score = sum(_ratio(n, QUESTIONS_PER_TRAIT) for n in counts) / len(counts)
    advice = [f"trait {i} has {n} distinct question{'s' if n != 1 else ''}; add {_more(n, QUESTIONS_PER_TRAIT)} "
              f"more ({QUESTIONS_PER_TRAIT} advised)" for i, n in enumerate(counts, start=1) if n < QUESTIONS_PER_TRAIT]
    return PartScore("questions", score, 0.20, f"{sum(counts)} distinct over {len(counts)} traits", advice)


def _first_person(c: Constitution) -> PartScore:
    others = [i for i, t in enumerate(c.traits, start=1) if not FIRST_PERSON.search(t.trait)]
    advice = [f"trait {i} is not in the first person; rewrite it as 'I ...'" for i in others]
    first = len(c.traits) - len(others)
    return PartScore("first person", first / len(c.traits), 0.05, f"{first}/{len(c.traits)} traits", advice)


def _directives(c: Constitution) -> PartScore:
    sections = {"personality": c.directives.personality, "behavior": c.directives.behavior,
                "constraints": c.directives.constraints}
    score = sum(_ratio(len(items), DIRECTIVES_PER_SECTION) for items in sections.values()) / len(sections)
    advice = [f"directives.{key} has {len(items)}; add {_more(len(items), DIRECTIVES_PER_SECTION)} "
              f"({DIRECTIVES_PER_SECTION}+ advised)" for key, items in sections.items()
              if len(items) < DIRECTIVES_PER_SECTION]
    detail = ", ".join(f"{key} {len(items)}" for key, items in sections.items())
    return PartScore("directives", score, 0.15, detail, advice)


def _safety(c: Constitution) -> PartScore:
    refusals, boundaries = len(c.safety.refusals), len(c.safety.boundaries)
    score = 0.7 * _ratio(refusals, REFUSALS) + 0.3 * _ratio(boundaries, BOUNDARIES)
    advice = []
    if refusals < REFUSALS:
        advice.append(f"safety.refusals has {refusals}; add {_more(refusals, REFUSALS)} in-character refusals "
                      f"({REFUSALS}+ advised: e.g. weapons, self-harm, breaking into accounts)")
    if boundaries < BOUNDARIES:
        advice.append(f"safety.boundaries has {boundaries}; add {_more(boundaries, BOUNDARIES)} "
                      f"({BOUNDARIES}+ advised)")
    return PartScore("safety", score, 0.15, f"{refusals} refusals, {boundaries} boundaries", advice)


def _examples(c: Constitution) -> PartScore:
    count = len(c.examples)
    advice = ([f"{count} examples; add {_more(count, EXAMPLES)} prompt/response pairs in the character's voice "
               f"({EXAMPLES}+ advised)"] if count < EXAMPLES else [])
    return PartScore("examples", _ratio(count, EXAMPLES), 0.10, f"{count} examples", advice)


def _voice(c: Constitution) -> PartScore:
    voice = c.persona.voice
    words = len(voice.vocabulary)
    score = (bool(voice.tone) + bool(voice.formality) + _ratio(words, VOCABULARY)) / 3
    advice = []
    if not voice.tone:
        advice.append("persona.voice.tone is empty; describe the tone, e.g. 'gruff but warm'")
    if not voice.formality:
        advice.append("persona.voice.formality is empty; describe the register, e.g. 'informal'")
    if words < VOCABULARY:
        advice.append(f"persona.voice.vocabulary has {words}; add {_more(words, VOCABULARY)} favourite words "
                      f"or phrases ({VOCABULARY}+ advised)")
    detail = f"tone {'set' if voice.tone else 'missing'}, formality {'set' if voice.formality else 'missing'}, " \
             f"{words} vocabulary"
    return PartScore("voice", score, 0.10, detail, advice)


PARTS: tuple[Callable[[Constitution], PartScore], ...] = (
    _identity, _traits, _questions, _first_person, _directives, _safety, _examples, _voice)


def score_constitution(c: Constitution) -> QualityReport:
    """Score a constitution 0..1 with a per-part breakdown and advice (see the module docstring)."""
    parts = [part(c) for part in PARTS]
    overall = sum(part.score * part.weight for part in parts) / sum(part.weight for part in parts)
    return QualityReport(overall=round(overall, 4), parts=parts)


def quality_table(report: QualityReport, title: str = "constitution quality") -> "Table":
    """A rich table: one row per part with score, weight, what was measured and the advice."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{title}: {report.overall:.2f}", expand=True)
    for column in ("part", "score", "weight"):
        table.add_column(column, no_wrap=True)
    table.add_column("measured", ratio=1, overflow="fold")
    table.add_column("advice", ratio=2, overflow="fold")
    for part in report.parts:
        colour = "green" if part.score >= 1 else ("yellow" if part.score >= 0.5 else "red")
        table.add_row(part.name, f"[{colour}]{part.score:.2f}[/]", f"{part.weight:.2f}", escape(part.detail),
                      escape("\n".join(part.advice)) or "[dim]-[/]")
    return table
