"""Log-likelihood scoring of continuations, and multiple-choice accuracy the lm-evaluation-harness way.

    pairs = [encode_pair(tokenizer, context, " Paris"), ...]
    continuation_logprobs(model, tokenizer, pairs, adapter="persona")   # sum log p(continuation | context)
    results = score_multiple_choice(model, tokenizer, items, system_prompt=None, adapter=None)
    mc_accuracy(results)   # {"mc_accuracy": {value, n, ci}, "mc_accuracy_norm": ..., "by_category": ...}

Conventions of lm-evaluation-harness (`lm_eval/api/task.py`, multiple_choice output type, and
`HFLM._encode_pair`), so the numbers read like ARC-style `acc` / `acc_norm`:

- A choice is scored as the continuation `" " + choice` (the harness's default target delimiter,
  a single space) of the context; whitespace at the end of the context moves to the start of the
  continuation; the continuation's tokens are those of `encode(context + continuation)` after
  the first `len(encode(context))` tokens.
- `acc`: the choice with the largest summed log-probability of its tokens is the prediction.
  `acc_norm`: the same after dividing each sum by the choice's length in characters (the
  harness's `completion_len`, tokenizer independent).

For a chat model the context is the chat template with the question as the user turn and the
assistant turn opened with "Answer:" (a prefill), so the condition's system prompt and adapter
apply exactly as when it answers. Hidden states come from one batched forward pass over
right-padded rows; the vocabulary projection is done `vocab_chunk` rows of the output matrix at
a time with a running log-sum-exp, for the continuation positions only, so no
[batch, sequence, vocabulary] tensor (nor even [positions, vocabulary]) ever exists.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from character_baker.backends.generation.base import render_prompt
from character_baker.core.stats import proportion

if TYPE_CHECKING:
    import torch

TARGET_DELIMITER = " "
ANSWER_PREFILL = "Answer:"
Pair = tuple[list[int], list[int]]


def encode_pair(tokenizer: Any, context: str, continuation: str, move_whitespace: bool = True) -> Pair:
    """(context ids, continuation ids) as lm-eval's `_encode_pair` splits them (no special tokens added)."""
    if move_whitespace:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    context_ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    return context_ids, whole[len(context_ids):]


@contextlib.contextmanager
def scoring_mode(model: Any, adapter: str | None) -> Iterator[Any]:
    """Eval and inference mode with the named adapter on (base weights for None); flags restored after."""
    import torch

    from character_baker.backends.generation.hf import adapter_enabled, is_peft_model

    training = model.training
    active = model.active_adapter if is_peft_model(model) else None
    model.eval()
    try:
        with adapter_enabled(model, adapter), torch.inference_mode():
            yield model
    finally:
        model.train(training)
        if active is not None:
            model.set_adapter(active)


def _token_logprobs(model: Any, hidden: "torch.Tensor", targets: "torch.Tensor", vocab_chunk: int) -> "torch.Tensor":
    """log p(target) for each row of hidden ([positions, hidden]), the vocabulary projected in chunks."""
    import torch

    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    cap = getattr(model.config, "final_logit_softcapping", None)
    hidden = hidden.float()  # float32 logits whatever the model dtype: exact sums over a large vocabulary
    running = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
    picked = torch.zeros(hidden.shape[0], device=hidden.device)
    for start in range(0, weight.shape[0], vocab_chunk):
        logits = hidden @ weight[start:start + vocab_chunk].float().T
        if bias is not None:
            logits = logits + bias[start:start + vocab_chunk].float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        running = torch.logaddexp(running, torch.logsumexp(logits, dim=-1))
        inside = (targets >= start) & (targets < start + logits.shape[1])
        rows = inside.nonzero(as_tuple=True)[0]
        picked[rows] = logits[rows, targets[rows] - start]
    return picked - running


def _batch_logprobs(model: Any, batch: Sequence[Pair], pad_id: int, vocab_chunk: int) -> list[float]:
    """Summed continuation log-probs of one batch of pairs (right-padded, one forward pass)."""
    import torch

    from character_baker.backends.steering import backbone

    device = model.get_input_embeddings().weight.device
    rows = [context + continuation for context, continuation in batch]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)] = torch.tensor(tokens, device=device)
        mask[row, :len(tokens)] = 1
    hidden = backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    row_index, positions, targets = [], [], []
    for row, (context, continuation) in enumerate(batch):
        row_index += [row] * len(continuation)
        positions += range(len(context) - 1, len(context) + len(continuation) - 1)
        targets += continuation
    selected = hidden[torch.tensor(row_index, device=device), torch.tensor(positions, device=device)]
    token_scores = _token_logprobs(model, selected, torch.tensor(targets, device=device), vocab_chunk)
    sums = torch.zeros(len(batch), device=device).index_add_(0, torch.tensor(row_index, device=device), token_scores)
    return [float(value) for value in sums.cpu()]


def continuation_logprobs(model: Any, tokenizer: Any, pairs: Sequence[Pair], *, adapter: str | None = None,
                          batch_size: int = 16, vocab_chunk: int = 8192) -> list[float]:
    """Sum of log p(continuation token | everything before it) per (context ids, continuation ids) pair."""
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("every pair needs a non-empty context and continuation")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(pairs)), key=lambda index: len(pairs[index][0]) + len(pairs[index][1]))
    scores: list[float] = [0.0] * len(pairs)
    with scoring_mode(model, adapter):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for index, value in zip(chunk, _batch_logprobs(model, [pairs[i] for i in chunk], pad_id, vocab_chunk)):
                scores[index] = value
    return scores


# ----------------------------------------------------------------------------- multiple choice
def mc_conversation(item: dict, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The item as a chat: optional system prompt, the question as the user turn, the reply opened with 'Answer:'."""
    question = f"{item['passage']}\n\n{item['question']}" if item.get("passage") else item["question"]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER_PREFILL}]


def mc_pairs(tokenizer: Any, item: dict, system_prompt: str | None = None) -> list[Pair]:
    """One (context, continuation) pair per choice: the rendered chat and ' ' + the choice."""
    context = render_prompt(tokenizer, mc_conversation(item, system_prompt))
    return [encode_pair(tokenizer, context, TARGET_DELIMITER + choice) for choice in item["choices"]]


@dataclass(frozen=True)
class ChoiceResult:
    """One scored item: the log-likelihood of each choice, the predictions, and the right answer."""

    category: str
    loglikelihoods: tuple[float, ...]
    predicted: int
    predicted_norm: int
    answer: int


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda index: values[index])


def score_multiple_choice(model: Any, tokenizer: Any, items: Sequence[dict], *, system_prompt: str | None = None,
                          adapter: str | None = None, batch_size: int = 16) -> list[ChoiceResult]:
    """Every item scored: `acc` and `acc_norm` predictions (see the module docstring) per item."""
    pairs = [mc_pairs(tokenizer, item, system_prompt) for item in items]
    flat = continuation_logprobs(model, tokenizer, [pair for group in pairs for pair in group], adapter=adapter,
                                 batch_size=batch_size)
    results, start = [], 0
    for item, group in zip(items, pairs):
        scores = flat[start:start + len(group)]
        start += len(group)
        normalised = [score / len(choice) for score, choice in zip(scores, item["choices"])]
        results.append(ChoiceResult(item.get("category", ""), tuple(scores), _argmax(scores), _argmax(normalised),
                                    int(item["answer"])))
    return results


def mc_accuracy(results: Sequence[ChoiceResult]) -> dict[str, Any]:
    """Accuracy and length-normalised accuracy with Wilson intervals, overall and per category, with chance."""
    def block(subset: Sequence[ChoiceResult]) -> dict[str, Any]:
        return {"mc_accuracy": proportion(sum(r.predicted == r.answer for r in subset), len(subset)).to_dict(),
                "mc_accuracy_norm": proportion(sum(r.predicted_norm == r.answer for r in subset),
                                               len(subset)).to_dict(),
                "chance": sum(1 / len(r.loglikelihoods) for r in subset) / len(subset) if subset else None}

    categories = sorted({r.category for r in results})
    return {**block(results), "by_category": {c: block([r for r in results if r.category == c]) for c in categories}}
