"""Grading short answers leniently: normalised text, the first number or yes/no, or the answer as a word.

Shared by eval's generative capability items and by distill's checkable prompts (a chosen answer
to an arithmetic question must contain the right number).

    is_lenient_match("Arr, 'tis 1295, matey!", {"answer": "1295"})   # True: the first number is graded
    contains_answer("23 and 58 make 81", {"answer": "81"})              # True: 81 occurs as a number
"""

from __future__ import annotations

import re

_ARTICLE = re.compile(r"^(the|a|an)\s+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_YES_NO = re.compile(r"\b(yes|no)\b")


def normalise_answer(text: str) -> str:
    """Lower case, no thousands separators, no surrounding punctuation or leading article, single spaces."""
    text = _THOUSANDS.sub("", text.strip().lower())
    text = re.sub(r"\s+", " ", text).strip(" .,!?;:'\"`*()[]")
    return _ARTICLE.sub("", text)


def _targets(item: dict) -> set[str]:
    return {normalise_answer(answer) for answer in [item["answer"], *item.get("aliases", [])]}


def contains_answer(reply: str, item: dict) -> bool:
    """The answer or an alias occurs in the reply as a whole word (or number)."""
    text = normalise_answer(reply)
    return any(re.search(rf"(?<![\w.]){re.escape(target)}(?![\w]|\.\d)", text) for target in _targets(item) if target)


def extract_answer(reply: str, item: dict) -> str | None:
    """The part of the reply that is graded: its first number (numeric answers) or first yes/no; else None."""
    answer = normalise_answer(item["answer"])
    text = normalise_answer(reply)
    if _NUMBER.fullmatch(answer):
        found = _NUMBER.search(text)
        return found.group(0) if found else ""
    if answer in ("yes", "no"):
        found = _YES_NO.search(text)
        return found.group(1) if found else ""
    return None


def is_lenient_match(reply: str, item: dict) -> bool:
    """First number / first yes-no equals the answer; other answers must occur as a whole word."""
    extracted = extract_answer(reply, item)
    if extracted is None:
        return contains_answer(reply, item)
    return extracted in _targets(item) or any(_same_number(extracted, t) for t in _targets(item))


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False
