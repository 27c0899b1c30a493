"""A persona scorer trained on this run's own answers: P(in character | text), no judge, no GPU.

The teacher (the model with the character in its system prompt) and the student (the same model
without it) answer the same prompts; their answers are the positive and negative examples. A
logistic regression learns what separates them from two kinds of features:

- the character's **cues**: how many of the constitution's voice words and phrases (and its
  name) the text uses, as a few dense features (any cue; one, two, three or more distinct cues);
- hashed word 1- and 2-grams (their weights summed and divided by the square root of their
  number, between a sum and a mean: 0.84 held-out accuracy on a CPU demo run against 0.56-0.82 for
  a plain mean), for the rest of its style and what the plain assistant says instead.

The cues matter most with small teachers: a 135M teacher playing a pirate is often only partly in
character, so n-grams alone also learn whatever else differs (length, digits); with the cues a
candidate that talks like the character ranks above one that merely came from the teacher. It trains in about a
second on a few hundred answers, is saved as a small JSON file beside the data
(`data/persona_scorer.json`), and is what best-of-K selection, the training monitor and the
calibration step score persona strength with. It measures *this run's* teacher, so it is only as
good as the teacher's voice is distinct; eval's MiniLM classifier and the judge are the
independent measures.

    scorer = PersonaScorer.fit(teacher_texts, student_texts, cues=["arr", "matey", "Captain Rook"], seed=0)
    scorer.score(["Arr, matey!", "As an AI language model..."])   # -> [0.9.., 0.0..]
    scorer.holdout_accuracy                                          # accuracy on held-out answers
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from character_baker.core.text import WORD

FEATURE_BUCKETS = 1 << 16
HOLDOUT_SHARE = 0.2
RUN_FILE = "data/persona_scorer.json"  # where a run keeps its scorer (written by distill's data stage)
CUE_FEATURES = ("any_cue", "one_cue", "two_cues", "three_or_more_cues")


def text_features(text: str, buckets: int = FEATURE_BUCKETS) -> list[int]:
    """Hashed word unigrams and bigrams of a text (crc32, so stable across processes and machines)."""
    tokens = WORD.findall(text.lower())
    grams = tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]
    return [zlib.crc32(gram.encode("utf-8")) % buckets for gram in grams]


def cue_pattern(cues: Sequence[str]) -> re.Pattern | None:
    """One case-insensitive pattern matching any cue as whole words (None for no cues)."""
    words = [" ".join(WORD.findall(cue.lower())) for cue in cues]
    words = sorted({w for w in words if w}, key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<![a-z0-9'])(" + "|".join(r"\s+".join(map(re.escape, w.split())) for w in words) + r")(?![a-z0-9'])")


def cue_values(text: str, pattern: re.Pattern | None) -> list[float]:
    """The dense cue features of a text: any cue, exactly one distinct cue, two, three or more."""
    if pattern is None:
        return [0.0] * len(CUE_FEATURES)
    distinct = len({" ".join(match.split()) for match in pattern.findall(text.lower())})
    return [float(distinct >= 1), float(distinct == 1), float(distinct == 2), float(distinct >= 3)]


@dataclass
class PersonaScorer:
    """Logistic regression on cue features and hashed n-grams, with its held-out accuracy."""

    weights: dict[int, float]
    bias: float
    cues: list[str] = field(default_factory=list)
    cue_weights: list[float] = field(default_factory=lambda: [0.0] * len(CUE_FEATURES))
    holdout_accuracy: float | None = None
    holdout_n: int = 0
    trained_on: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._pattern = cue_pattern(self.cues)

    def logit(self, text: str) -> float:
        """Bias + cue weights . cue features + the n-gram weights summed over sqrt(their number)."""
        features = text_features(text)
        grams = sum(self.weights.get(f, 0.0) for f in features) / math.sqrt(len(features)) if features else 0.0
        cues = sum(w * v for w, v in zip(self.cue_weights, cue_values(text, self._pattern)))
        return self.bias + cues + grams

    def score(self, texts: Sequence[str]) -> list[float]:
        """P(in character) per text."""
        return [_sigmoid(self.logit(t)) for t in texts]

    def in_character_rate(self, texts: Sequence[str]) -> float | None:
        """Share of texts scored above 0.5 (None for no texts)."""
        return sum(s > 0.5 for s in self.score(texts)) / len(texts) if texts else None

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, positives: Sequence[str], negatives: Sequence[str], *, cues: Sequence[str] = (), seed: int = 0,
            epochs: int = 30, learning_rate: float = 0.5, l2: float = 1e-4) -> "PersonaScorer":
        """Train on in-character (`positives`) vs out-of-character (`negatives`) texts; score a held-out fifth."""
        examples = [(text, 1.0) for text in positives] + [(text, 0.0) for text in negatives]
        random.Random(seed).shuffle(examples)
        cut = int(len(examples) * HOLDOUT_SHARE) if len(examples) >= 10 else 0
        heldout, train = examples[:cut], examples[cut:]
        scorer = cls({}, 0.0, cues=list(cues),
                     trained_on={"in_character": len(positives), "out_of_character": len(negatives)})
        scorer._train(train, seed, epochs, learning_rate, l2)
        if heldout:
            correct = sum((scorer.logit(text) > 0) == (label > 0.5) for text, label in heldout)
            scorer.holdout_accuracy, scorer.holdout_n = correct / len(heldout), len(heldout)
        # The reported accuracy is held out; the scorer that is used learns from every answer.
        scorer._train(examples, seed, epochs, learning_rate, l2)
        return scorer

    def _train(self, examples: Sequence[tuple[str, float]], seed: int, epochs: int, learning_rate: float,
               l2: float) -> None:
        """Plain SGD on the class-balanced logistic loss, from zero; deterministic for a seed."""
        featurised = [(text_features(t), cue_values(t, self._pattern), label) for t, label in examples]
        positives = sum(label for *_, label in featurised)
        count = len(featurised)
        balance = {1.0: count / (2 * positives) if positives else 1.0,
                   0.0: count / (2 * (count - positives)) if count > positives else 1.0}
        self.weights, self.bias, self.cue_weights = {}, 0.0, [0.0] * len(CUE_FEATURES)
        order, rng = list(range(count)), random.Random(seed)
        for epoch in range(epochs):
            rng.shuffle(order)
            rate = learning_rate / (1 + epoch * 0.1)
            for index in order:
                grams, cues, label = featurised[index]
                norm = math.sqrt(len(grams)) if grams else 1.0
                pooled = sum(self.weights.get(f, 0.0) for f in grams) / norm
                logit = self.bias + sum(w * v for w, v in zip(self.cue_weights, cues)) + pooled
                error = (_sigmoid(logit) - label) * balance[label]
                for f in grams:
                    self.weights[f] = self.weights.get(f, 0.0) * (1 - rate * l2) - rate * error / norm
                self.cue_weights = [w * (1 - rate * l2) - rate * error * v for w, v in zip(self.cue_weights, cues)]
                self.bias -= rate * error * 0.1

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (weights rounded to 6 significant digits)."""
        return {"kind": "cues+hashed-ngram-logistic", "buckets": FEATURE_BUCKETS, "bias": self.bias,
                "cues": self.cues, "cue_features": list(CUE_FEATURES),
                "cue_weights": [float(f"{w:.6g}") for w in self.cue_weights],
                "weights": {str(k): float(f"{v:.6g}") for k, v in sorted(self.weights.items()) if v},
                "holdout_accuracy": self.holdout_accuracy, "holdout_n": self.holdout_n, "trained_on": self.trained_on}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PersonaScorer":
        """Inverse of `to_dict`."""
        return cls({int(k): float(v) for k, v in data["weights"].items()}, float(data["bias"]),
                   list(data.get("cues", [])), [float(w) for w in data.get("cue_weights", [0.0] * len(CUE_FEATURES))],
                   data.get("holdout_accuracy"), int(data.get("holdout_n", 0)), dict(data.get("trained_on", {})))

    @classmethod
    def load(cls, path: str | Path) -> "PersonaScorer":
        """Read a scorer written by `to_dict` (a run's own file)."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))
