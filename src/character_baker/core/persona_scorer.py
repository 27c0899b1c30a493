"""A persona scorer trained on this run's own answers: P(in character | text), no judge, no GPU.

The teacher (the model with the character in its system prompt) and the student (the same model
without it) answer the same prompts; their answers are the positive and negative examples. A
logistic regression over hashed word 1- and 2-grams (mean of the text's feature weights plus a
bias) learns what separates them: the character's words, its turns of phrase, what the plain
assistant says instead. It trains in well under a second on a few hundred answers, is saved as a
small JSON file beside the data, and is what best-of-K selection, the training monitor and the
calibration step score persona strength with. It measures *this run's* teacher, so it is only as
good as the teacher's voice is distinct; eval's MiniLM classifier and the judge are the
independent measures.

    scorer = PersonaScorer.fit(teacher_texts, student_texts, seed=0)
    scorer.score(["Arr, matey!", "As an AI language model..."])   # -> [0.97, 0.02]
    scorer.holdout_accuracy                                          # accuracy on held-out answers
"""

from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from character_baker.core.text import WORD

FEATURE_BUCKETS = 1 << 16
RUN_FILE = "data/persona_scorer.json"  # where a run keeps its scorer (written by distill's data stage)
HOLDOUT_SHARE = 0.2


def text_features(text: str, buckets: int = FEATURE_BUCKETS) -> list[int]:
    """Hashed word unigrams and bigrams of a text (crc32, so stable across processes and machines)."""
    tokens = WORD.findall(text.lower())
    grams = tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]
    return [zlib.crc32(gram.encode("utf-8")) % buckets for gram in grams]


@dataclass
class PersonaScorer:
    """Logistic regression on hashed n-grams: weights per bucket (sparse), a bias, and its held-out accuracy."""

    weights: dict[int, float]
    bias: float
    holdout_accuracy: float | None = None
    holdout_n: int = 0
    trained_on: dict[str, int] = field(default_factory=dict)

    def logit(self, text: str) -> float:
        """Bias plus the mean weight of the text's features (a text with no words scores the bias)."""
        features = text_features(text)
        if not features:
            return self.bias
        return self.bias + sum(self.weights.get(f, 0.0) for f in features) / len(features)

    def score(self, texts: Sequence[str]) -> list[float]:
        """P(in character) per text."""
        return [1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, self.logit(t))))) for t in texts]

    def in_character_rate(self, texts: Sequence[str]) -> float | None:
        """Share of texts scored above 0.5 (None for no texts)."""
        return sum(s > 0.5 for s in self.score(texts)) / len(texts) if texts else None

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, positives: Sequence[str], negatives: Sequence[str], *, seed: int = 0, epochs: int = 30,
            learning_rate: float = 0.5, l2: float = 1e-4) -> "PersonaScorer":
        """Train on in-character (`positives`) vs out-of-character (`negatives`) texts; score a held-out fifth."""
        examples = [(text, 1.0) for text in positives] + [(text, 0.0) for text in negatives]
        random.Random(seed).shuffle(examples)
        cut = int(len(examples) * HOLDOUT_SHARE) if len(examples) >= 10 else 0
        heldout, train = examples[:cut], examples[cut:]
        weights, bias = _train(train, seed, epochs, learning_rate, l2)
        scorer = cls(weights, bias, trained_on={"in_character": len(positives), "out_of_character": len(negatives)})
        if heldout:
            correct = sum((scorer.logit(text) > 0) == (label > 0.5) for text, label in heldout)
            scorer.holdout_accuracy, scorer.holdout_n = correct / len(heldout), len(heldout)
        # The reported accuracy is held out; the scorer that is used learns from every answer.
        scorer.weights, scorer.bias = _train(examples, seed, epochs, learning_rate, l2)
        return scorer

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (weights rounded to 6 significant digits)."""
        return {"kind": "hashed-ngram-logistic", "buckets": FEATURE_BUCKETS, "bias": self.bias,
                "weights": {str(k): float(f"{v:.6g}") for k, v in sorted(self.weights.items()) if v},
                "holdout_accuracy": self.holdout_accuracy, "holdout_n": self.holdout_n, "trained_on": self.trained_on}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PersonaScorer":
        """Inverse of `to_dict`."""
        return cls({int(k): float(v) for k, v in data["weights"].items()}, float(data["bias"]),
                   data.get("holdout_accuracy"), int(data.get("holdout_n", 0)), dict(data.get("trained_on", {})))

    @classmethod
    def load(cls, path: str | Path) -> "PersonaScorer":
        """Read a scorer written by `to_dict` (a run's own file)."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _train(examples: Sequence[tuple[str, float]], seed: int, epochs: int, learning_rate: float,
           l2: float) -> tuple[dict[int, float], float]:
    """Plain SGD on the logistic loss with a class-balanced weight per example; deterministic for a seed."""
    featurised = [(text_features(text), label) for text, label in examples]
    positives = sum(label for _, label in featurised)
    balance = {1.0: len(featurised) / (2 * positives) if positives else 1.0,
               0.0: len(featurised) / (2 * (len(featurised) - positives)) if len(featurised) > positives else 1.0}
    weights: dict[int, float] = {}
    bias = 0.0
    order = list(range(len(featurised)))
    rng = random.Random(seed)
    for epoch in range(epochs):
        rng.shuffle(order)
        rate = learning_rate / (1 + epoch * 0.1)
        for index in order:
            features, label = featurised[index]
            if not features:
                continue
            logit = bias + sum(weights.get(f, 0.0) for f in features) / len(features)
            error = (1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit)))) - label) * balance[label]
            step = rate * error / len(features)
            for f in features:
                weights[f] = weights.get(f, 0.0) * (1 - rate * l2) - step
            bias -= rate * error * 0.1
    return weights, bias
