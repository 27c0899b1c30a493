"""Text checks shared by the data and evaluation stages: words and n-grams, word-overlap dedupe, answer filters."""

from __future__ import annotations

import re
from collections import Counter

WORD = re.compile(r"[a-z0-9']+")
FINAL_PUNCTUATION = tuple('.!?…"\')]*~`') + ("```",)
REFUSAL_PATTERNS = re.compile(
    r"\b(i can(?:'|no)t help with|i can ?not (?:help|assist|provide)|i won'?t (?:help|assist|provide)|"
    r"i'?m (?:sorry|afraid),? but i can'?t|i am unable to|i'm unable to|i must decline|i cannot comply|"
    r"i will not (?:help|assist|provide)|not able to help with that)\b", re.IGNORECASE)


def words(text: str) -> set[str]:
    """Lower-cased word set of a text."""
    return set(word_tokens(text))


def word_overlap(a: str, b: str) -> float:
    """Share of the words of `a` that also occur in `b` (0 when `a` has no words)."""
    wa = words(a)
    return len(wa & words(b)) / len(wa) if wa else 0.0


class OverlapDeduper:
    """Keeps texts whose words overlap no kept text by more than `threshold` (either direction)."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self._kept: list[set[str]] = []
        self._index: dict[str, list[int]] = {}

    def _too_close(self, candidate: set[str]) -> bool:
        seen: set[int] = set()
        for word in candidate:
            for index in self._index.get(word, ()):
                if index in seen:
                    continue
                seen.add(index)
                kept = self._kept[index]
                shared = len(candidate & kept)
                if shared / len(candidate) > self.threshold or shared / len(kept) > self.threshold:
                    return True
        return False

    def add(self, text: str) -> bool:
        """Keep `text` unless it is too close to a kept one; return whether it was kept."""
        candidate = words(text)
        if not candidate or self._too_close(candidate):
            return False
        index = len(self._kept)
        self._kept.append(candidate)
        for word in candidate:
            self._index.setdefault(word, []).append(index)
        return True


def is_truncated(text: str, finish_reason: str) -> bool:
    """True when an answer hit the token limit or does not end like a finished sentence."""
    stripped = text.rstrip()
    return finish_reason == "length" or not stripped.endswith(FINAL_PUNCTUATION) and not stripped[-1:].isdigit() \
        and not _ends_with_emoji(stripped)


def _ends_with_emoji(text: str) -> bool:
    return bool(text) and ord(text[-1]) > 0x2190


def word_tokens(text: str) -> list[str]:
    """The lower-cased words of a text, in order (letters, digits and apostrophes)."""
    return WORD.findall(text.lower())


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Every word n-gram of a text, in order (empty when it has fewer than n words)."""
    tokens = word_tokens(text)
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of word n-grams that are repeats: high values mean degenerate repetition."""
    grams = word_ngrams(text, n)
    if len(grams) < 4:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def contains_phrase(text: str, phrases: list[str]) -> str | None:
    """The first phrase (case-insensitive) found in `text`, or None."""
    lowered = text.lower()
    return next((p for p in phrases if p.lower() in lowered), None)


def is_refusal(text: str) -> bool:
    """True when a text reads as a refusal to help."""
    return bool(REFUSAL_PATTERNS.search(text[:400]))


TITLES = {"captain", "doctor", "dr", "mr", "mrs", "ms", "sir", "lady", "lord", "professor", "the", "madam", "king",
          "queen", "master", "mistress", "old", "young", "big", "little"}


def name_variants(persona_name: str) -> set[str]:
    """The full name and every contiguous part of it, except lone titles and very short words."""
    parts = persona_name.replace('"', " ").split()
    variants = set()
    for start in range(len(parts)):
        for end in range(start + 1, len(parts) + 1):
            span = " ".join(parts[start:end])
            if end - start == 1 and (span.lower() in TITLES or len(span) <= 2):
                continue
            variants.add(span)
    return variants


def pov_confusion(text: str, persona_name: str) -> str | None:
    """Why a text speaks *to* or *about* the persona instead of *as* it, or None when it is fine.

    Flags: opening by addressing the persona by name ("Captain Mara, ..."), addressing it as
    "you, <name>", and speaking of it in the third person ("<name> is", "<name>'s ship").
    """
    names = name_variants(persona_name)
    stripped = text.strip()
    for name in sorted(names, key=len, reverse=True):
        escaped = re.escape(name)
        if re.match(rf"^(?:dear |hey |hi |hello |oh )?{escaped}\s*[,!:]", stripped, re.IGNORECASE):
            return f"addresses the persona by name ('{name}, ...')"
        if re.search(rf"\byou,? {escaped}\b", stripped, re.IGNORECASE):
            return f"addresses the persona as 'you, {name}'"
        if re.search(rf"\b{escaped}(?:'s| is| was| has| would| will| said| says| thinks| feels)\b", stripped):
            return f"speaks of the persona in the third person ('{name} is ...')"
    return None
