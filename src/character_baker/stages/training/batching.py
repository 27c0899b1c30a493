"""Length-bucketed batches and collation: padding is not compute.

Data order is a pure function of (seed, epoch, example lengths), independent of the number of
processes, so a resumed run or a run on more GPUs sees exactly the same optimiser batches:

1. shuffle every example index with `seed + epoch`;
2. cut the shuffled order into buckets of `batch_size * BUCKET_BATCHES` examples and sort each
   bucket by length, so neighbouring examples have similar lengths;
3. cut the buckets into global batches of `batch_size` (one optimiser step each; an incomplete
   last batch is skipped) and shuffle the order of the batches with the seed;
4. inside a global batch (sorted by length) consecutive runs of `micro_batch_size` form the
   micro-batches; process `rank` takes micro-batches rank, rank + world, ... (gradient
   accumulation runs over them), so each process gets a similar share of tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from character_baker.stages.training.tokenize import TokenizedSequence

BUCKET_BATCHES = 8


@dataclass
class Batch:
    """One micro-batch on its way to the model.

    `counts` is this micro-batch's share of each normaliser an objective averages over (e.g.
    pairs, response tokens); `totals` is the same summed over the whole optimiser batch on every
    process. Losses are `sum / totals[...]`, so micro-batches and processes add up to the exact
    global-batch mean whatever the accumulation or world size.
    """

    ids: list[str]
    input_ids: torch.Tensor       # [rows, seq] right-padded
    attention_mask: torch.Tensor  # [rows, seq] 1 on real tokens
    loss_mask: torch.Tensor       # [rows, seq] 1 on trained tokens
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    sequence_tokens: int | None = None  # set when rows pack several sequences (prefix sharing)
    host_input_ids: torch.Tensor | None = None  # the CPU copy of input_ids once the batch is on a GPU

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequences in the batch (padding excluded; a shared prefix counts once per sequence)."""
        return self.sequence_tokens if self.sequence_tokens is not None else self.computed_tokens

    @property
    def computed_tokens(self) -> int:
        """Real (non-padding) token positions the model runs."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch with every tensor on `device`."""
        move = dict(non_blocking=True)
        return Batch(self.ids, self.input_ids.to(device, **move), self.attention_mask.to(device, **move),
                     self.loss_mask.to(device, **move), {k: v.to(device, **move) for k, v in self.extras.items()},
                     dict(self.counts), dict(self.totals), self.sequence_tokens,
                     self.input_ids if self.input_ids.device.type == "cpu" else self.host_input_ids)


def collate_sequences(sequences: Sequence[TokenizedSequence], pad_token_id: int) -> Batch:
    """Right-pad sequences to the longest one; the attention mask marks real tokens."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence.input_ids)
        attention_mask[row, :len(sequence)] = 1
        loss_mask[row, :len(sequence)] = torch.tensor(sequence.loss_mask)
    return Batch([sequence.id for sequence in sequences], input_ids, attention_mask, loss_mask)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimiser steps in one pass (the incomplete last batch is skipped)."""
    return num_examples // batch_size


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches (lists of example indices, sorted by length) of one epoch, in order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket], key=lambda index: lengths[index])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    batches = [batch for batch in batches if len(batch) == batch_size]
    rng.shuffle(batches)
    return [sorted(batch, key=lambda index: (lengths[index], index)) for batch in batches]


def micro_batches(global_batch: Sequence[int], micro_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This process's micro-batches of one global batch (consecutive runs, interleaved over processes)."""
    runs = [list(global_batch[i:i + micro_batch_size]) for i in range(0, len(global_batch), micro_batch_size)]
    return runs[rank::world_size]
