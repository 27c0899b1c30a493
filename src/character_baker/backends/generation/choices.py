"""Constrained choices: the log-probability of each option label as the first tokens of the reply.

`GenerationBackend.label_logprobs(conversations, labels)` returns, per conversation, a
`{label: log p}`, so a judge's verdict is the most likely label and always "parses". How each
backend reads it:

- hf (in-process): exact. Each label is scored as the continuation of the rendered prompt
  (chat template with the generation prompt): the sum of its tokens' log-probs, through
  `backends.scoring.continuation_logprobs` (batched, the vocabulary projected in chunks).
- vllm: exact and the same: one request per (conversation, label) whose prompt is the rendered
  prompt plus the label's tokens, with `SamplingParams(prompt_logprobs=0, max_tokens=1)`; the
  label's log-prob is the sum of its prompt log-probs.
- openai (any OpenAI-compatible server): the first reply token only (`max_tokens=1`,
  `logprobs=True`, `top_logprobs`): each returned token that, stripped and lower-cased, starts
  exactly one label adds its probability to that label (`first_token_label_logprobs`). Labels
  never seen get -inf; a conversation where no label was seen gets None (the judge then falls
  back to the free-text reply).
- anthropic: the Messages API returns no log-probs: None (free-text replies, parsed).

`labels` is one list for every conversation, or one list per conversation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from character_baker.backends.generation.base import Messages, render_prompt

if TYPE_CHECKING:
    from character_baker.backends.scoring import Pair

LabelScores = dict[str, float]


def labels_per_conversation(labels: Sequence[str] | Sequence[Sequence[str]], count: int) -> list[list[str]]:
    """One label list per conversation (a flat list applies to all); every list non-empty and unique."""
    rows = [list(labels)] * count if labels and isinstance(labels[0], str) else [list(row) for row in labels]
    if len(rows) != count:
        raise ValueError(f"{len(rows)} label lists for {count} conversations")
    for row in rows:
        if not row or len(set(row)) != len(row) or not all(isinstance(label, str) and label for label in row):
            raise ValueError(f"labels must be distinct non-empty strings, got {row!r}")
    return rows


def label_pairs(tokenizer: Any, conversations: Sequence[Messages], labels: Sequence[Sequence[str]]) -> list["Pair"]:
    """(prompt ids, label ids) for every label of every conversation, conversation by conversation."""
    from character_baker.backends.scoring import encode_pair

    pairs = []
    for conversation, row in zip(conversations, labels):
        prompt = render_prompt(tokenizer, conversation)
        pairs += [encode_pair(tokenizer, prompt, label, move_whitespace=False) for label in row]
    return pairs


def regroup(scores: Sequence[float], labels: Sequence[Sequence[str]]) -> list[LabelScores]:
    """Flat scores (conversation by conversation, label by label) -> one {label: score} per conversation."""
    out, start = [], 0
    for row in labels:
        out.append(dict(zip(row, scores[start:start + len(row)])))
        start += len(row)
    return out


def hf_label_logprobs(model: Any, tokenizer: Any, conversations: Sequence[Messages],
                      labels: Sequence[Sequence[str]], adapter: str | None, batch_size: int) -> list[LabelScores]:
    """Exact label log-probs from an in-process model (see the module docstring)."""
    from character_baker.backends.scoring import continuation_logprobs

    pairs = label_pairs(tokenizer, conversations, labels)
    return regroup(continuation_logprobs(model, tokenizer, pairs, adapter=adapter, batch_size=batch_size), labels)


def prompt_label_logprob(prompt_logprobs: Sequence[Any], token_ids: Sequence[int], label_start: int) -> float:
    """Sum of vLLM prompt log-probs of token_ids[label_start:] (entries map token id -> Logprob)."""
    return sum(float(prompt_logprobs[position][token_ids[position]].logprob)
               for position in range(label_start, len(token_ids)))


def first_token_label_logprobs(top: Sequence[tuple[str, float]], labels: Sequence[str]) -> LabelScores | None:
    """Label log-probs from a first-token top-k list [(token text, log p)]; None when no token names a label."""
    mass = {label: 0.0 for label in labels}
    seen = False
    for token, logprob in top:
        text = token.strip().lower()
        matches = [label for label in labels if text and label.lower().startswith(text)]
        if len(matches) == 1:
            mass[matches[0]] += math.exp(logprob)
            seen = True
    if not seen:
        return None
    return {label: math.log(value) if value > 0 else -math.inf for label, value in mass.items()}
