"""CUDA graphs of the batching engine's decode step: one per (rows, adapter state), captured on first use.

    graphs = DecodeGraphs(max_rows=256, enabled=device.type == "cuda")
    rows = graphs.rows_for(highest_busy_slot + 1)        # 1, 2, 4, ... max_rows: a few shapes only
    logits = graphs.run((rows, adapter_state), cache_version, forward)   # replay, or capture then replay

Why: a small model's eager decode step is bound by the CPU launching its kernels (SmolLM2-135M:
30 layers, ~20 kernels each, more under an unmerged LoRA adapter), not by the GPU running them;
a replayed graph launches them all at once. The static-cache decode loop (decoding.py) does the
same for offline batches.

What a graph needs: every shape fixed (so the step reads every cache column under a mask, and the
rows are rounded up to a bucket whose extra rows are empty slots), every per-step input in a
tensor the graph reads (the engine's step-input buffer), and nothing read on the host. A graph
holds pointers to the KV cache: when the cache is reallocated (more positions or more slots,
`cache_version` changes) every graph is dropped and recaptured at its next use. A batch that mixes
adapters runs eagerly (PEFT splits it by adapter on the host), as does any key whose capture failed.

A capture costs about two eager steps, so a key is captured only once it has been asked for
`CAPTURE_AFTER` steps in a row: while a burst of arrivals changes the row count every step, the
steps run eagerly (as fast as they ran before graphs) instead of paying a capture per step, and
the batch the burst settles into is captured once.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch

from character_baker.backends.generation.decoding import capture_cuda_graph

CAPTURE_AFTER = 3  # consecutive steps with the same key before it is captured

Capture = Callable[[Callable[[], torch.Tensor], Any], "tuple[Any, torch.Tensor] | None"]


def bucket_sizes(max_rows: int) -> list[int]:
    """Row counts a graph is captured for: powers of two below max_rows, then max_rows."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return sizes + [max_rows]


def cuda_capture(forward: Callable[[], torch.Tensor], pool: Any) -> tuple[Any, torch.Tensor] | None:
    """(replay, output) of `forward` captured as a CUDA graph in `pool`; None when capture fails."""
    captured = capture_cuda_graph(forward, pool)
    return None if captured is None else (captured[0].replay, captured[1])


class DecodeGraphs:
    """Captured decode steps keyed by (rows, adapter state); dropped whenever the cache is reallocated.

    `capture` is how a forward becomes (replay, output): CUDA graphs by default; a test passes a
    recording stand-in to check the bookkeeping on a CPU.
    """

    def __init__(self, max_rows: int, *, enabled: bool, capture: Capture | None = None):
        self.enabled = enabled
        self.sizes = bucket_sizes(max_rows)
        self.capture = capture or cuda_capture
        self.captures = 0  # graphs captured so far (recaptures included)
        self._graphs: dict[Hashable, tuple[Callable[[], Any], torch.Tensor] | None] = {}
        self._version: Hashable = None
        self._last_key: Hashable = None
        self._streak = 0  # consecutive steps that asked for _last_key
        self._pool = torch.cuda.graph_pool_handle() if enabled and capture is None else None

    def rows_for(self, needed: int) -> int:
        """Rows the step runs over: `needed` itself when eager, else the smallest bucket that holds it."""
        if not self.enabled:
            return needed
        return next(size for size in self.sizes if size >= needed)

    def run(self, key: Hashable, cache_version: Hashable, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's output: replay the graph of `key` (captured once it is asked for CAPTURE_AFTER steps in a row), or `forward()` eagerly."""
        if cache_version != self._version:
            self._graphs.clear()
            self._version = cache_version
        self._streak = self._streak + 1 if key == self._last_key else 1
        self._last_key = key
        if key not in self._graphs:
            if self._streak < CAPTURE_AFTER:
                return forward()
            self._graphs[key] = self.capture(forward, self._pool)
            self.captures += 1
        entry = self._graphs[key]
        if entry is None:  # capture failed for this key: stay eager
            return forward()
        replay, output = entry
        replay()
        return output
