"""Prefix sharing for preference pairs: the prompt runs once, not twice.

A pair's chosen and rejected sequences share their prompt token for token. Instead of two rows
`[prompt | chosen]` and `[prompt | rejected]`, a pair becomes one row

    [shared prefix | rest of chosen | rest of rejected]
     positions 0..L-1 | L..len(chosen)-1 | L..len(rejected)-1      (position ids restart at L)

with an attention mask that is causal, except that the rejected tokens never see the chosen ones
(Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"). Every
token then sees exactly the context it has in its own sequence, at the same position, so each
log-prob is the one the two-row layout computes (up to floating-point summation order) and the
loss and gradients are the same; the shared prefix is computed once. The shared prefix is the
longest common token prefix of the two sequences (the prompt, plus any identical opening of the
two answers), leaving at least one token in each branch.

The first token of each branch is predicted from the last shared position, so log-probs are
read through explicit gather indices: `gather` (flat indices into [rows x width] hidden states)
and `labels`, ordered [chosen of pair 1..n, rejected of pair 1..n] like the two-row layout.

With `pack` (several pairs per row), pairs are placed first-fit, longest first, into rows as wide
as the longest pair, so short pairs fill what would be padding: a row then holds

    [pair A: shared | chosen | rejected][pair B: shared | chosen | rejected] ...

and a token sees only tokens of its own pair (the same rule inside each pair; position ids
restart at 0 for each pair). Same log-probs, loss and gradients; fewer padding positions.

The mask is built on the device from per-token segment ids, 3 x (pair's slot in its row) +
(0 shared, 1 chosen, 2 rejected), -1 for padding: boolean for SDPA, additive float for eager
attention, a block-sparse `BlockMask` for flex attention. SDPA cannot use its flash kernel with a custom mask (and repeats the
key/value heads for GQA), so on a GPU the trainer runs packed pairs through flex attention,
which skips the masked blocks and keeps GQA (see `use_flex_attention`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from character_baker.stages.training.batching import Batch
from character_baker.stages.training.losses import attention_implementation, unwrap_peft
from character_baker.stages.training.tokenize import TokenizedPair, TokenizedSequence

PAD, SHARED, CHOSEN, REJECTED = -1, 0, 1, 2
#: attention implementations that accept a custom mask (others run pairs as two rows).
MASKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")


def shared_prefix_length(pair: TokenizedPair) -> int:
    """Tokens the two sequences share from the start, leaving at least one token in each branch."""
    chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
    limit = min(len(chosen), len(rejected)) - 1
    length = 0
    while length < limit and chosen[length] == rejected[length]:
        length += 1
    return length


def packed_length(pair: TokenizedPair) -> int:
    """Tokens of the pair's shared row (what is computed)."""
    return len(pair.chosen) + len(pair.rejected) - shared_prefix_length(pair)


def _targets(sequence: TokenizedSequence, row_start: int, shared: int, branch_start: int) -> tuple[list[int], list[int]]:
    """Flat hidden-state indices and labels of a sequence's trained tokens inside its packed row."""
    gather, labels = [], []
    for index in range(1, len(sequence)):
        if sequence.loss_mask[index]:
            source = index - 1  # the position whose output predicts token `index`
            packed = source if source < shared else branch_start + source - shared
            gather.append(row_start + packed)
            labels.append(sequence.input_ids[index])
    return gather, labels


def pack_rows(lengths: Sequence[int], pack: bool) -> list[list[int]]:
    """Pair indices per row: one pair per row, or first-fit longest-first into rows of the longest length."""
    if not pack:
        return [[index] for index in range(len(lengths))]
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def collate_shared_prefix(pairs: Sequence[TokenizedPair], pad_token_id: int, pack: bool = False) -> Batch:
    """Prefix-shared pairs, one per row or packed (`pack`), right-padded; extras hold position ids, segments,
    gather indices, labels, row_tokens.

    `attention_mask` (2D) marks the computed tokens; `num_tokens` counts the pair's two sequences
    (as the two-row layout does), so throughput figures mean the same in both layouts. Labels
    and gather indices keep the two-row order [chosen of each pair..., rejected of each pair...].
    """
    lengths = [packed_length(pair) for pair in pairs]
    layout = pack_rows(lengths, pack)
    width = max(sum(lengths[i] for i in row) for row in layout)
    input_ids = torch.full((len(layout), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(layout), width), dtype=torch.long)
    segments = torch.full((len(layout), width), PAD, dtype=torch.int16)
    chosen_targets: list = [None] * len(pairs)
    rejected_targets: list = [None] * len(pairs)
    for row, members in enumerate(layout):
        offset = 0
        for slot, index in enumerate(members):
            pair, start = pairs[index], row * width + offset
            shared = shared_prefix_length(pair)
            chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
            ids = list(chosen) + list(rejected[shared:])
            end = offset + len(ids)
            input_ids[row, offset:end] = torch.tensor(ids)
            position_ids[row, offset:end] = torch.tensor(list(range(len(chosen))) + list(range(shared, len(rejected))))
            segments[row, offset:offset + shared] = 3 * slot + SHARED
            segments[row, offset + shared:offset + len(chosen)] = 3 * slot + CHOSEN
            segments[row, offset + len(chosen):end] = 3 * slot + REJECTED
            chosen_targets[index] = _targets(pair.chosen, start, shared, shared)
            rejected_targets[index] = _targets(pair.rejected, start, shared, len(chosen))
            offset = end
    targets = chosen_targets + rejected_targets
    attention_mask = (segments != PAD).long()
    batch = Batch([pair.id for pair in pairs], input_ids, attention_mask, torch.zeros_like(attention_mask))
    batch.extras.update(position_ids=position_ids, segments=segments,
                        gather=torch.tensor([i for g, _ in targets for i in g], dtype=torch.long),
                        labels=torch.tensor([t for _, l in targets for t in l], dtype=torch.long),
                        row_tokens=torch.tensor([len(g) for g, _ in targets], dtype=torch.long))
    batch.sequence_tokens = sum(len(pair) for pair in pairs)
    return batch


def visible(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Whether a query token may see a key token of the same row, by segment ids (positions aside).

    Both real; the same pair; and the key is in the shared prefix or in the query's own branch.
    """
    same_pair = torch.div(query, 3, rounding_mode="floor") == torch.div(key, 3, rounding_mode="floor")
    return (key >= 0) & (query >= 0) & ((key == query) | (same_pair & (torch.remainder(key, 3) == SHARED)))


def attention_mask_4d(segments: torch.Tensor, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """[rows, 1, width, width] mask from segment ids: causal, no rejected -> chosen, no other pair, no padding keys.

    Boolean (True = attend) for SDPA; for eager attention, 0 where allowed and the dtype's minimum
    elsewhere. A padding query attends to itself, so no softmax row is empty (no NaN anywhere).
    """
    width = segments.shape[1]
    index = torch.arange(width, device=segments.device)
    segments = segments.to(torch.int32)
    query, key = segments[:, None, :, None], segments[:, None, None, :]
    allowed = (index[None, None, None, :] <= index[None, None, :, None]) & visible(query, key)
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def flex_block_mask(segments: torch.Tensor) -> Any:
    """The same mask as `attention_mask_4d`, as a flex-attention `BlockMask` (masked blocks are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = segments.shape
    # Built eagerly (~9 ms for 4 rows of 1,792 tokens on an H100): `_compile=True` would recompile
    # for every batch, since each batch brings a new mask closure (measured: 12% slower steps).
    return create_block_mask(mask_mod(segments), rows, None, width, width, device=segments.device)


def mask_mod(segments: torch.Tensor) -> Any:
    """The flex-attention mask rule of `attention_mask_4d` over these rows' segment ids."""
    segments = segments.to(torch.int32)

    def allowed(row: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return ((key <= query) & visible(segments[row, query], segments[row, key])) | (query == key)

    return allowed


def flex_attention_available() -> bool:
    """True when torch has flex attention (2.5+) and a CUDA GPU is there to run it compiled."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def use_flex_attention(model: nn.Module) -> str | None:
    """Switch an SDPA model on a GPU to flex attention for packed pairs; return the implementation to restore."""
    current = attention_implementation(model)
    if current != "sdpa" or next(model.parameters()).device.type != "cuda" or not flex_attention_available():
        return None
    unwrap_peft(model).set_attn_implementation("flex_attention")
    return current


def restore_attention(model: nn.Module, implementation: str | None) -> None:
    """Undo `use_flex_attention`."""
    if implementation is not None:
        unwrap_peft(model).set_attn_implementation(implementation)


@contextmanager
def sdpa_instead_of_flex(model: nn.Module) -> Iterator[None]:
    """While the block runs, a model switched to flex attention runs SDPA with the same mask.

    For forwards that run eagerly (see `dpo.eager_forward`): flex attention is fast only compiled;
    outside compile it is a dense reference implementation.
    """
    if attention_implementation(model) != "flex_attention":
        yield
        return
    unwrap_peft(model).set_attn_implementation("sdpa")
    try:
        yield
    finally:
        unwrap_peft(model).set_attn_implementation("flex_attention")
