"""Streaming statistics over per-prompt activation vectors: nothing is kept per prompt.

- `RunningMoments`: mean and variance of a stream of tensors, batch by batch (Welford's update,
  in the batched form of Chan, Golub and LeVeque 1979), in float64.
- `TopComponentSketch`: the first principal direction of a stream of row vectors, per layer,
  from a rank-k sketch updated by incremental SVD: after each batch the sketch B ([k, hidden]
  per layer) is replaced by the top-k part of svd([B; batch]), so B^T B tracks X^T X of every
  row seen so far (exactly while the rows span at most k dimensions, else up to the discarded
  tail). The rows are not centred: for paired differences (persona on minus off) the first
  component is then the dominant shared direction of the shift, the one steering needs.
"""

from __future__ import annotations

import torch


class RunningMoments:
    """Mean and (sample) variance over the first axis of every batch seen, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def update(self, batch: torch.Tensor) -> None:
        """Fold a batch [rows, ...] into the running moments."""
        batch = batch.detach().to(torch.float64)
        rows = batch.shape[0]
        if rows == 0:
            return
        batch_mean = batch.mean(0)
        batch_m2 = ((batch - batch_mean) ** 2).sum(0)
        if self.mean is None or self._m2 is None:
            self.count, self.mean, self._m2 = rows, batch_mean, batch_m2
            return
        total = self.count + rows
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (rows / total)
        self._m2 = self._m2 + batch_m2 + delta ** 2 * (self.count * rows / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance (zeros until two rows have been seen)."""
        if self._m2 is None:
            raise ValueError("no data seen yet")
        return self._m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self._m2)


class TopComponentSketch:
    """First principal direction (uncentred) of rows [rows, layers, dim], per layer, from a rank-k sketch."""

    def __init__(self, rank: int = 16) -> None:
        self.rank = rank
        self.sketch: torch.Tensor | None = None  # [layers, <=rank, dim]: singular values x right vectors

    def update(self, rows: torch.Tensor) -> None:
        """Fold a batch of rows [rows, layers, dim] into the sketch."""
        per_layer = rows.detach().to(torch.float64).transpose(0, 1)  # [layers, rows, dim]
        stacked = per_layer if self.sketch is None else torch.cat([self.sketch, per_layer], dim=1)
        _, singular, right = torch.linalg.svd(stacked, full_matrices=False)
        keep = min(self.rank, singular.shape[-1])
        self.sketch = singular[..., :keep, None] * right[..., :keep, :]

    def first_component(self) -> torch.Tensor:
        """Unit first principal direction per layer, [layers, dim] (its sign is arbitrary)."""
        if self.sketch is None:
            raise ValueError("no data seen yet")
        top = self.sketch[:, 0, :]
        return top / top.norm(dim=-1, keepdim=True).clamp(min=1e-30)

    def explained(self) -> torch.Tensor:
        """Share of the sketch's energy along the first direction, per layer [layers]."""
        if self.sketch is None:
            raise ValueError("no data seen yet")
        energy = self.sketch.pow(2).sum(-1)
        return energy[:, 0] / energy.sum(-1).clamp(min=1e-30)
