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
apply exactly as when it answers.

Each context runs once, not once per choice. Pairs with identical context ids become one row

    [context | choice 1 | choice 2 | ...]      position ids: 0..C-1 | C..C+n1-1 | C..C+n2-1 | ...

with a mask where each choice sees the context and itself only, so every token has exactly the
context and position it has in its own sequence (the sums equal the one-row-per-pair ones up to
floating-point summation order). Choices beyond max(C, `BRANCH_TOKENS`) tokens open another row
with the same context, so a row stays short enough for its mask. The context prefix all rows
share (the chat template's system turn, a condition's system prompt) runs once, before the
first batch, into a key/value cache every row of every batch attends to. Hidden states come
from one batched forward pass per batch over the right-padded rows; the vocabulary projection is done `vocab_chunk`
rows of the output matrix at a time with a running log-sum-exp, for the continuation positions
only, so no [batch, sequence, vocabulary] tensor (nor even [positions, vocabulary]) ever exists.
Models whose attention takes no custom mask (flash attention, sliding windows) run one ordinary
row per pair instead, with the same results.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
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


#: a row's continuations hold at most max(context tokens, this) tokens; more start another row with the same context.
BRANCH_TOKENS = 64


@dataclass
class ContextRow:
    """One distinct context and the continuations scored after it (`indices`: their places in the input)."""

    context: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.context) + self.branch_tokens

    @property
    def branch_tokens(self) -> int:
        """Tokens of all the row's continuations."""
        return sum(map(len, self.continuations))


def context_rows(pairs: Sequence[Pair], share: bool = True) -> list[ContextRow]:
    """Pairs grouped by identical context ids in first-seen order (one row per pair when not `share`).

    A row's continuations stay within max(context length, `BRANCH_TOKENS`) tokens, so a row is
    never much longer than its context or its longest pair: the masked attention over it stays
    close to the cost of the rows it replaces.
    """
    rows: list[ContextRow] = []
    filling: dict[Any, ContextRow] = {}
    for index, (context, continuation) in enumerate(pairs):
        key = tuple(context) if share else index
        row = filling.get(key)
        if row is None or row.branch_tokens + len(continuation) > max(len(context), BRANCH_TOKENS):
            row = filling[key] = ContextRow(list(context))
            rows.append(row)
        row.continuations.append(list(continuation))
        row.indices.append(index)
    return rows


def shared_prefix(rows: Sequence[ContextRow]) -> int:
    """Leading tokens every row's context shares, leaving at least one context token in each row."""
    if len(rows) < 2:
        return 0
    limit = min(len(row.context) for row in rows) - 1
    first = rows[0].context
    length = 0
    while length < limit and all(row.context[length] == first[length] for row in rows):
        length += 1
    return length


def shares_contexts(model: Any) -> bool:
    """True when the model takes the custom attention mask a shared context needs (full sdpa/eager attention)."""
    from character_baker.backends.generation.hf import supports_static_engine

    return supports_static_engine(model)


@dataclass
class RowLayout:
    """Rows [context | continuation 1 | continuation 2 | ...] after a prefix of `prefix` cached tokens.

    `segments` is 0 on context tokens, k on the k-th continuation, -1 on padding; each
    continuation's position ids restart where the context ends. `gather` (flat indices into
    [rows x width] hidden states) and `targets` are the positions and tokens scored, `owner` the
    pair each belongs to.
    """

    input_ids: "torch.Tensor"
    position_ids: "torch.Tensor"
    segments: "torch.Tensor"
    gather: "torch.Tensor"
    targets: "torch.Tensor"
    owner: "torch.Tensor"


def row_layout(rows: Sequence[ContextRow], prefix: int, pad_id: int, device: Any) -> RowLayout:
    """The right-padded rows of a batch (see `RowLayout`), the first `prefix` context tokens left out."""
    import torch

    width = max(len(row) for row in rows) - prefix
    ids, positions, segments, gather, targets, owner = [], [], [], [], [], []
    for number, row in enumerate(rows):
        tokens, places = row.context[prefix:], list(range(prefix, len(row.context)))
        marks = [0] * len(tokens)
        last = len(tokens) - 1  # the context's last position predicts each continuation's first token
        for branch, (continuation, index) in enumerate(zip(row.continuations, row.indices), start=1):
            sources = [last] + list(range(len(tokens), len(tokens) + len(continuation) - 1))
            gather += [number * width + source for source in sources]
            targets += continuation
            owner += [index] * len(continuation)
            tokens, marks = tokens + continuation, marks + [branch] * len(continuation)
            places += range(len(row.context), len(row.context) + len(continuation))
        padding = width - len(tokens)
        ids.append(tokens + [pad_id] * padding)
        positions.append(places + [0] * padding)
        segments.append(marks + [-1] * padding)

    def tensor(values: list) -> "torch.Tensor":
        return torch.tensor(values, dtype=torch.long, device=device)

    return RowLayout(tensor(ids), tensor(positions), tensor(segments), tensor(gather), tensor(targets), tensor(owner))


def branch_mask(segments: "torch.Tensor", prefix: int, dtype: "torch.dtype", additive: bool) -> "torch.Tensor":
    """[rows, 1, width, prefix + width] mask: causal, the prefix and context seen by all, a continuation by itself.

    Boolean (True = attend) for SDPA; 0 / the dtype's minimum for eager attention. Padding keys
    are never seen; a padding query sees itself, so no softmax row is empty.
    """
    import torch

    rows, width = segments.shape
    index = torch.arange(width, device=segments.device)
    query, key = segments[:, None, :, None], segments[:, None, None, :]
    allowed = (index[None, None, None, :] <= index[None, None, :, None]) & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    allowed = torch.cat([allowed.new_ones((rows, 1, width, prefix)), allowed], dim=-1)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class PrefixCache:
    """Keys/values of the context prefix all rows share, computed once; duck-types what attention layers call of a Cache.

    The first forward (the prefix alone, one row) stores each layer's keys/values. Every later
    forward attends to [the prefix, repeated for its rows | its own keys/values] and stores
    nothing, so one prefix serves every batch and only one layer's repeat exists at a time.
    """

    is_compileable = False

    def __init__(self) -> None:
        self.keys: list["torch.Tensor"] = []
        self.values: list["torch.Tensor"] = []

    def update(self, key_states: "torch.Tensor", value_states: "torch.Tensor", layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Store the prefix's keys/values of one layer (first forward), else return them before this forward's."""
        import torch

        if layer_idx == len(self.keys):
            self.keys.append(key_states)
            self.values.append(value_states)
            return key_states, value_states
        rows = key_states.shape[0]
        return (torch.cat([self.keys[layer_idx].expand(rows, -1, -1, -1), key_states], dim=2),
                torch.cat([self.values[layer_idx].expand(rows, -1, -1, -1), value_states], dim=2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Prefix tokens held."""
        return int(self.keys[0].shape[2]) if self.keys else 0

    def __len__(self) -> int:
        return len(self.keys)


def _masked_forward(model: Any, layout: RowLayout, prefix: PrefixCache | None) -> "torch.Tensor":
    """Hidden states of the layout's rows under `branch_mask`, attending to the prefix cache when there is one."""
    from character_baker.backends.generation.engine import _cache_argument
    from character_baker.backends.steering import backbone

    decoder = backbone(model)
    additive = getattr(model.config, "_attn_implementation", "eager") == "eager"
    mask = branch_mask(layout.segments, prefix.get_seq_length() if prefix else 0,
                       model.get_input_embeddings().weight.dtype, additive)
    cache = {_cache_argument(decoder): prefix, "use_cache": True} if prefix is not None else {"use_cache": False}
    return decoder(input_ids=layout.input_ids, attention_mask=mask, position_ids=layout.position_ids,
                   **cache).last_hidden_state


def prefix_cache(model: Any, tokens: list[int]) -> PrefixCache:
    """The prefix's keys/values, from one forward pass."""
    cache = PrefixCache()
    device = model.get_input_embeddings().weight.device
    _masked_forward(model, row_layout([ContextRow(list(tokens))], 0, 0, device), cache)
    return cache


def _batch_logprobs(model: Any, rows: Sequence[ContextRow], pad_id: int, vocab_chunk: int, share: bool,
                    prefix: PrefixCache | None) -> list[tuple[int, float]]:
    """(pair index, summed continuation log-prob) for every continuation of one batch of rows, one forward pass.

    With `share`, rows hold a context and its continuations under `branch_mask`, after the
    shared `prefix` when there is one; otherwise each row is one ordinary right-padded pair.
    """
    import torch

    from character_baker.backends.steering import backbone

    device = model.get_input_embeddings().weight.device
    layout = row_layout(rows, prefix.get_seq_length() if prefix else 0, pad_id, device)
    if share:
        hidden = _masked_forward(model, layout, prefix)
    else:
        hidden = backbone(model)(input_ids=layout.input_ids, attention_mask=(layout.segments >= 0).long(),
                                 use_cache=False).last_hidden_state
    selected = hidden.reshape(-1, hidden.shape[-1])[layout.gather]
    token_scores = _token_logprobs(model, selected, layout.targets, vocab_chunk)
    owners, slot = torch.unique(layout.owner, return_inverse=True)
    sums = torch.zeros(len(owners), device=device).index_add_(0, slot, token_scores)
    return [(int(index), float(value)) for index, value in zip(owners.cpu(), sums.cpu())]


def continuation_logprobs(model: Any, tokenizer: Any, pairs: Sequence[Pair], *, adapter: str | None = None,
                          batch_size: int = 16, vocab_chunk: int = 8192) -> list[float]:
    """Sum of log p(continuation token | everything before it) per (context ids, continuation ids) pair.

    Pairs with the same context ids share one row (see the module docstring): `batch_size` is
    the number of rows, each a context with its continuations, per forward pass.
    """
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("every pair needs a non-empty context and continuation")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = [0.0] * len(pairs)
    with scoring_mode(model, adapter):
        share = shares_contexts(model)
        rows = sorted(context_rows(pairs, share), key=len)
        length = shared_prefix(rows) if share else 0
        prefix = prefix_cache(model, rows[0].context[:length]) if length else None
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            for index, value in _batch_logprobs(model, batch, pad_id, vocab_chunk, share, prefix):
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
