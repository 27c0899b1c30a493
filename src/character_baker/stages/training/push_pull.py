"""The push/pull activation regulariser: an `ExtraLoss` any trainer (distill, introspect, sdft) switches on.

    regularisers = push_pull_losses(ctx.recipe, ctx.run, stage="distill")      # [] unless enabled for it
    run_training(..., extra_losses=regularisers, callbacks=balance_callbacks(regularisers))

Forward hooks on the decoder layers that hold push/pull dimensions keep each layer's output
*with its graph* (never detached, so the term carries gradient to the LoRA weights), during
forwards with gradients enabled only (a no-grad reference or teacher pass is ignored). Each
row's activation is averaged over its response tokens (`batch.loss_mask`; padding and prompt
never count), and for each row

    published:  mean_j relu(-a_push_j) + mean_j a_pull_j^2        over every push / pull dimension
    z_weighted: mean over layers of  sum_j w_j relu(-a_j / s_l)  +  sum_j w_j (a_j / s_l)^2

where in the z-weighted variant w_j = |z_j| / sum |z| over the layer's push (or pull) set and s_l
is the layer's RMS activation with the persona off (so every layer counts the same whatever its
scale). The term is `coef * mean over rows`, `coef = push_pull.weight` (published 0.1 each).

Balance (`push_pull.balance_ratio`): each micro-batch's coefficient is
`ratio * main / raw.detach()`, where raw is that micro-batch's own (unweighted) term and main is
the previous optimiser step's main loss, read from the logged record by the trainer callback
`observe`. The term's value is then exactly `ratio x` the previous step's main loss (a one-step
lag on the smooth main loss only) and its gradient is the raw term's, rescaled. The first step
(and the first after a resume) uses `weight`.

Logged as `push_pull_loss` (the weighted term, by the trainer), `push_raw`, `pull_raw` and
`push_pull_coef`. A micro-batch contributes its mean over rows times its share of the optimiser
batch's examples (its first count, e.g. pairs or prompts), so micro-batches add up to the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from character_baker.backends.steering import (PROFILE_FILE, backbone, decoder_layers, layer_hidden, read_profile,
                                               response_mean)
from character_baker.core.config import PushPullConfig, Recipe
from character_baker.core.runs import RunDir, file_hash
from character_baker.stages.training.batching import Batch

NAME = "push_pull"


@dataclass(frozen=True)
class LayerTargets:
    """The push and pull dimensions of one layer with their weights, and the layer's activation scale."""

    layer: int
    push: torch.Tensor         # long [n_push]
    push_weight: torch.Tensor  # float [n_push]
    pull: torch.Tensor         # long [n_pull]
    pull_weight: torch.Tensor  # float [n_pull]
    scale: float

    def to(self, device: torch.device) -> "LayerTargets":
        """The same targets with their tensors on `device`."""
        return LayerTargets(self.layer, self.push.to(device), self.push_weight.to(device), self.pull.to(device),
                            self.pull_weight.to(device), self.scale)


def _set_weights(mask: torch.Tensor, z: torch.Tensor, variant: str, total: int, layers_with_set: int) -> torch.Tensor:
    if variant == "published":
        return torch.full((int(mask.sum()),), 1.0 / max(total, 1))
    magnitudes = z[mask].abs()
    return magnitudes / magnitudes.sum().clamp(min=1e-30) / max(layers_with_set, 1)


def targets_from_profile(tensors: dict[str, torch.Tensor], variant: str = "published",
                         top_layers: int | None = None) -> list[LayerTargets]:
    """Targets of every profiled layer with a push or pull set (or of the `top_layers` most important)."""
    push, pull, z = tensors["push"].bool(), tensors["pull"].bool(), tensors["z"].float()
    layers = [i for i in range(z.shape[0]) if push[i].any() or pull[i].any()]
    if top_layers is not None:
        ranked = sorted(layers, key=lambda i: -float(tensors["importance"][i]))
        layers = sorted(ranked[:top_layers])
    total_push, total_pull = int(push[layers].sum()), int(pull[layers].sum())
    with_push, with_pull = sum(bool(push[i].any()) for i in layers), sum(bool(pull[i].any()) for i in layers)
    targets = []
    for i in layers:
        scale = float(tensors["layer_scale"][i]) if variant == "z_weighted" else 1.0
        push_weight = _set_weights(push[i], z[i], variant, total_push, with_push)
        pull_weight = _set_weights(pull[i], z[i], variant, total_pull, with_pull)
        targets.append(LayerTargets(i, push[i].nonzero().flatten(), push_weight, pull[i].nonzero().flatten(),
                                    pull_weight, max(scale, 1e-12)))
    return targets


def push_pull_rows(means: dict[int, torch.Tensor],
                   targets: Sequence[LayerTargets]) -> tuple[torch.Tensor, torch.Tensor]:
    """(push term, pull term) per row from each layer's response means [rows, dim]."""
    push = pull = None
    for target in targets:
        activations = means[target.layer] / target.scale
        layer_push = (torch.relu(-activations[:, target.push]) * target.push_weight).sum(-1)
        layer_pull = (activations[:, target.pull].pow(2) * target.pull_weight).sum(-1)
        push = layer_push if push is None else push + layer_push
        pull = layer_pull if pull is None else pull + layer_pull
    if push is None or pull is None:
        raise ValueError("push/pull has no target layers")
    return push, pull


def example_share(batch: Batch) -> float:
    """This micro-batch's share of the optimiser batch's examples (its first count; 1 when totals are unset)."""
    if not batch.counts:
        return 1.0
    key = next(iter(batch.counts))
    return batch.counts[key] / batch.totals.get(key, batch.counts[key])


class PushPullRegulariser:
    """`ExtraLoss`: raise push activations, lower pull activations, on response tokens, with gradient."""

    name = NAME

    def __init__(self, targets: Sequence[LayerTargets], weight: float, balance_ratio: float | None = None,
                 source: str = ""):
        self.targets, self.weight, self.balance_ratio, self.source = list(targets), weight, balance_ratio, source
        self.main_loss: float | None = None  # the previous step's main loss, once observed
        self._hidden: dict[int, torch.Tensor] = {}
        self._armed = False
        self._handles: list[Any] = []
        self._on_device: list[LayerTargets] = []

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies this term (for checkpoint fingerprints and stage hashes)."""
        return {"name": self.name, "source": self.source, "weight": self.weight, "balance_ratio": self.balance_ratio,
                "layers": [t.layer for t in self.targets], "dims": [len(t.push) + len(t.pull) for t in self.targets]}

    def attach(self, model: nn.Module) -> None:
        """Hook the targeted decoder layers (keeping the graph) and arm on each grad-enabled forward."""
        self.detach_hooks()
        layers = decoder_layers(model)
        self._handles.append(backbone(model).register_forward_pre_hook(lambda module, inputs: self._arm()))
        for target in self.targets:
            self._handles.append(layers[target.layer].register_forward_hook(
                lambda module, inputs, output, i=target.layer: self._capture(i, output)))

    def detach_hooks(self) -> None:
        """Remove every hook this regulariser registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _arm(self) -> None:
        if torch.is_grad_enabled():
            self._hidden.clear()
            self._armed = True

    def _capture(self, layer: int, output: Any) -> None:
        # Not during no-grad passes, nor when checkpointed layers re-run in backward (disarmed by `loss`).
        if self._armed and torch.is_grad_enabled():
            self._hidden[layer] = layer_hidden(output)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """coef x (push + pull) averaged over rows, as this micro-batch's contribution; and the raw terms."""
        missing = [t.layer for t in self.targets if t.layer not in self._hidden]
        if missing:
            raise RuntimeError(f"push/pull captured no activations for layers {missing}: attach() it to the model "
                               "that runs the objective's forward, with gradients enabled")
        if not self._on_device:
            self._on_device = [t.to(batch.loss_mask.device) for t in self.targets]
        means = {}
        for target in self._on_device:
            hidden = self._hidden[target.layer]
            if hidden.shape[:2] != batch.loss_mask.shape:
                raise RuntimeError(f"push/pull: layer output {tuple(hidden.shape[:2])} does not match the batch's "
                                   f"loss mask {tuple(batch.loss_mask.shape)}")
            means[target.layer] = response_mean(hidden, batch.loss_mask)
        self._hidden, self._armed = {}, False
        push, pull = push_pull_rows(means, self._on_device)
        share = example_share(batch)
        push_raw, pull_raw = push.mean() * share, pull.mean() * share
        coef = self.coefficient(push_raw + pull_raw, share)
        metrics = {"push_raw": push_raw, "pull_raw": pull_raw, "push_pull_coef": coef * share}
        return coef * (push_raw + pull_raw), metrics

    def coefficient(self, raw: torch.Tensor, share: float) -> torch.Tensor:
        """`weight`, or once balancing: ratio x previous main loss / this micro-batch's raw term (per unit share)."""
        if self.balance_ratio is None or self.main_loss is None:
            return torch.tensor(self.weight, device=raw.device)
        return self.balance_ratio * self.main_loss * share / raw.detach().clamp(min=1e-12)

    def observe(self, record: dict[str, Any]) -> None:
        """Trainer callback after each optimiser step: remember its main loss (total minus this term)."""
        self.main_loss = abs(record["loss"] - record.get(f"{self.name}_loss", 0.0))


def profile_path(cfg: PushPullConfig, run: RunDir) -> Path:
    """The profile the regulariser reads: push_pull.profile, or this run's profile/profile.safetensors."""
    return Path(cfg.profile) if cfg.profile else run.path(PROFILE_FILE)


def is_enabled(recipe: Recipe, stage: str) -> bool:
    """True when the recipe switches push/pull on (push_pull.enabled or method push_pull) for `stage`."""
    return recipe.push_pull_joins(stage)


def push_pull_losses(recipe: Recipe, run: RunDir, stage: str) -> list[PushPullRegulariser]:
    """[the regulariser] when the recipe switches it on for `stage`, else []."""
    if not is_enabled(recipe, stage):
        return []
    cfg = recipe.push_pull
    path = profile_path(cfg, run)
    tensors, _ = read_profile(path, "push_pull.profile")
    targets = targets_from_profile(tensors, cfg.variant, cfg.top_layers)
    source = f"{path}:{file_hash(path)}:{cfg.variant}"
    return [PushPullRegulariser(targets, cfg.weight, cfg.balance_ratio, source=source)]


def balance_callbacks(regularisers: Sequence[PushPullRegulariser]) -> list[Callable[[dict], None]]:
    """The trainer callbacks that keep each regulariser balanced."""
    return [regulariser.observe for regulariser in regularisers]
