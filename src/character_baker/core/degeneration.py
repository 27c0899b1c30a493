"""Degeneration of generated answers, without a judge: loops, repetition, diversity, truncation, length.

Pure functions over answer texts (words = lower-cased `[a-z0-9']+` runs, `core.text.word_tokens`,
so the numbers compare across tokenizers). `degeneration_summary` gives every measure of one
answer set as an estimate `{value, n, ci}`:

| measure | definition | interval |
|---|---|---|
| looping_rate | share of answers in which some word 4-gram occurs 3 or more times (ours) | Wilson |
| rep_2, rep_4 | seq-rep-n of Welleck et al. 2019, per answer, averaged over answers (see `rep_n`) | normal, in [0, 1] |
| distinct_1, distinct_2 | distinct-n of Li et al. 2016 over the whole answer set (see `distinct_n`) | jackknife over answers |
| at_token_limit | share of answers that stopped at the token limit (finish reason "length") | Wilson |
| mean_words | mean answer length in words | normal |
| mean_tokens | mean answer length in model tokens (when the counts are known) | normal |

References. Welleck, Kulikov, Roller, Dinan, Cho, Weston (2019), "Neural Text Generation with
Unlikelihood Training" (arXiv:1908.04319), section 6.1: the sequence-level repetition of a
continuation x is  seq-rep-n = 1 - |unique n-grams(x)| / |n-grams(x)|,  the portion of duplicate
n-grams, reported as the mean over continuations (their code: `ngram_metrics`, pct_repeat_ngrams).
Welleck et al. report diversity as uniq-seq, the number of distinct tokens over all continuations,
which is the numerator of distinct-1; distinct-n itself is Li, Galley, Brockett, Gao, Dolan (2016),
"A Diversity-Promoting Objective Function for Neural Conversation Models": the number of distinct
n-grams over all generated answers divided by the total number of n-grams, so 1 means no n-gram is
ever repeated across the answers and values near 0 mean every answer says the same thing.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

from character_baker.core.stats import jackknife_estimate, mean_estimate, proportion
from character_baker.core.text import word_ngrams, word_tokens

LOOP_NGRAM, LOOP_REPEATS = 4, 3
REP_NS, DISTINCT_NS = (2, 4), (1, 2)


def max_ngram_count(text: str, n: int) -> int:
    """How often the most frequent word n-gram of the text occurs (0 when it has fewer than n words)."""
    counts = Counter(word_ngrams(text, n))
    return max(counts.values(), default=0)


def is_looping(text: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """True when some word n-gram occurs `repeats` or more times in the text."""
    return max_ngram_count(text, n) >= repeats


def rep_n(text: str, n: int) -> float | None:
    """Welleck et al.'s seq-rep-n of one answer: 1 - unique n-grams / n-grams; None below n words."""
    grams = word_ngrams(text, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Li et al.'s distinct-n of an answer set: distinct n-grams / all n-grams, pooled; None without n-grams."""
    grams = [gram for text in texts for gram in word_ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else None


def degeneration_summary(texts: Sequence[str], finish_reasons: Sequence[str] | None = None,
                         token_counts: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Every degeneration measure of one answer set (see the module docstring), each {value, n, ci}."""
    texts = list(texts)
    out: dict[str, dict[str, Any]] = {
        "looping_rate": proportion(sum(is_looping(t) for t in texts), len(texts)).to_dict()}
    for n in REP_NS:
        values = [v for v in (rep_n(t, n) for t in texts) if v is not None]
        out[f"rep_{n}"] = mean_estimate(values, bounds=(0.0, 1.0)).to_dict()
    for n in DISTINCT_NS:
        out[f"distinct_{n}"] = jackknife_estimate(texts, lambda sample, n=n: distinct_n(sample, n), (0.0, 1.0)).to_dict()
    if finish_reasons is not None:
        out["at_token_limit"] = proportion(sum(r == "length" for r in finish_reasons), len(finish_reasons)).to_dict()
    out["mean_words"] = mean_estimate([float(len(word_tokens(t))) for t in texts]).to_dict()
    if token_counts is not None:
        out["mean_tokens"] = mean_estimate([float(c) for c in token_counts]).to_dict()
    return out


SENTENCE_END = re.compile(r"(?<=[.!?\u2026])([\"')\]*]*)\s+|\n+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: split after sentence-final punctuation (closing quotes kept) and at line breaks."""
    spans, start = [], 0
    for match in SENTENCE_END.finditer(text):
        end = match.start() + len(match.group(1) or "")  # closing quotes and brackets stay with their sentence
        if text[start:end].strip():
            spans.append((start, end))
        start = match.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def trim_repetition(text: str) -> str:
    """The text cut before the first sentence that repeats an earlier one or makes the text loop.

    A stop rule for small models, whose free-form answers often start well and then repeat: the
    clean opening is kept, with its own formatting (and filtered as usual); an answer that loops
    within its first sentence comes back empty.
    """
    seen: set[str] = set()
    for start, end in sentence_spans(text):
        key = " ".join(word_tokens(text[start:end]))
        if (key and key in seen) or is_looping(text[:end]):
            return text[:start].rstrip()
        seen.add(key)
    return text.strip()


def cut_to_last_sentence(text: str, min_words: int = 12) -> str | None:
    """A text that stopped at the token limit, cut after its last finished sentence; None when too little is left.

    Trains the habit of ending an answer instead of the habit of stopping mid-sentence; what is cut
    is counted as a truncation only when fewer than `min_words` words would remain."""
    spans = sentence_spans(text)
    finished = [end for start, end in spans if re.search(r"[.!?\u2026][\"')\]*]*$", text[start:end].rstrip())]
    if not finished:
        return None
    cut = text[:finished[-1]].rstrip()
    return cut if len(word_tokens(cut)) >= min_words else None
