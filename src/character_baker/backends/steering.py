"""Residual-stream access for every method that reads or writes it: hooks, the profile file, steering.

    layers = decoder_layers(model)                         # the blocks whose outputs are the residual stream
    vectors = load_steering(run.path(PROFILE_FILE), "pca")  # [layers, hidden] from `character-baker profile`
    with steering(model, vectors, strength=4.0):            # layers 12.5%..87.5% of depth
        backend.generate(conversations, sampling)
    steered = steered_backend(hf_backend, run.path("profile"), recipe.steer)   # the evaluation's condition

Steering is the baseline the evaluation compares baked personas against: a persona direction
(the mean activation difference, persona prompt on minus off, or its first principal component)
is added, times `strength`, to the output of every decoder layer in a range of depth, at every
position. `SteeredBackend` wraps an HF backend so that all its generations are steered (its
adapter fingerprint names the vectors, strength and layers, so cached answers never mix);
`steered_backend` is the hook the evaluation's "steered" condition calls. It all lives here,
below the stages, so the profiling stage (which writes the vectors), the push/pull regulariser
and the evaluation stage (which read them) share one file format and one set of hooks without
importing each other.

The profile file (`profile/profile.safetensors`) holds float32 tensors named by `PROFILE_KEYS`
(each [layers, hidden] unless noted) and metadata (model, prompts, threshold, layer count).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

from character_baker.backends.generation.base import GenerationBackend
from character_baker.core.config import SteerConfig
from character_baker.core.errors import UserError

PROFILE_FILE = "profile/profile.safetensors"
VectorKind = Literal["mean_diff", "pca"]
PROFILE_KEYS = {
    "mean_on": "mean activation with the persona prompt and in-character answers",
    "mean_off": "mean activation without the prompt, assistant-style answers",
    "var_on": "variance across prompts, persona on",
    "var_off": "variance across prompts, persona off",
    "z": "z-score of the difference per dimension (mean_on - mean_off over the pooled standard deviation)",
    "push": "1 where the dimension is in the push set (z above +threshold, or the per-layer fallback)",
    "pull": "1 where the dimension is in the pull set (z below -threshold, or the per-layer fallback)",
    "importance": "[layers] root-mean-square z of each layer",
    "layer_scale": "[layers] root-mean-square activation of each layer with the persona off",
    "steer_mean_diff": "steering vector per layer: mean_on - mean_off",
    "steer_pca": "steering vector per layer: first principal component of the per-prompt differences, "
                 "scaled to the mean difference's projection on it",
    "pca_explained": "[layers] share of the differences' energy along that component",
}
STEERING_KEYS: dict[str, str] = {"mean_diff": "steer_mean_diff", "pca": "steer_pca"}
DEFAULT_LAYER_START, DEFAULT_LAYER_END = 0.125, 0.875


# ----------------------------------------------------------------------------- residual stream
def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / accelerate wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "model", None), nn.Module) and not hasattr(model, "get_decoder"):
            model = model.model  # e.g. the trainer's ResponseScorer
        else:
            return model


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the output head (through PEFT/DDP wrappers): hidden states, no logits."""
    base = _unwrapped(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else base


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (through PEFT/DDP wrappers); their outputs are the residual stream."""
    base = _unwrapped(model)
    layers = getattr(backbone(base), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    count = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")


def layer_hidden(output: Any) -> torch.Tensor:
    """The hidden states [batch, seq, hidden] in a decoder layer's output (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def response_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's float32 mean of `hidden` [rows, seq, dim] over the positions where `mask` [rows, seq] is 1.

    Padding and prompt positions (mask 0) never count; a row without any counted position is 0.
    """
    weights = mask.to(device=hidden.device, dtype=torch.float32)[..., None]
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def steering_layers(num_layers: int, start: float = DEFAULT_LAYER_START, end: float = DEFAULT_LAYER_END) -> range:
    """Layer indices from `start` to `end` as shares of depth (0.125..0.875 of 32 layers = 4..27); never empty."""
    first = min(int(math.floor(start * num_layers)), num_layers - 1)
    last = max(int(math.ceil(end * num_layers)), first + 1)
    return range(first, min(last, num_layers))


# ----------------------------------------------------------------------------- the profile file
def read_profile(path: str | Path, field: str = "profile") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a profile file; UserError naming `field` when it is missing or not a profile."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError.single(str(path), field, "no activation profile here",
                               "run `character-baker profile CONSTITUTION` first, or point to a profile.safetensors")
    fix = "re-run `character-baker profile CONSTITUTION --force`"
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError.single(str(path), field, f"not a readable safetensors file ({error})", fix) from None
    missing = [key for key in PROFILE_KEYS if key not in tensors]
    if missing:
        raise UserError.single(str(path), field, f"not a character-baker profile (missing {missing})", fix)
    return tensors, metadata


@dataclass(frozen=True)
class SteeringVectors:
    """One steering vector per decoder layer, [layers, hidden] float32, and where it came from."""

    vectors: torch.Tensor
    kind: VectorKind
    source: str

    @property
    def num_layers(self) -> int:
        """Decoder layers the vectors cover."""
        return int(self.vectors.shape[0])


def load_steering(profile_path: str | Path, vector: VectorKind = "mean_diff") -> SteeringVectors:
    """The steering vectors of a profile: 'mean_diff' (mean difference) or 'pca' (first principal component)."""
    if vector not in STEERING_KEYS:
        raise UserError.single("recipe", "steer.vector", f"unknown steering vector {vector!r}",
                               f"use one of {sorted(STEERING_KEYS)}")
    tensors, _ = read_profile(profile_path)
    return SteeringVectors(tensors[STEERING_KEYS[vector]].float(), vector, str(profile_path))


# ----------------------------------------------------------------------------- steering
def _add_hook(delta: torch.Tensor):
    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        hidden = layer_hidden(output)
        shifted = hidden + delta.to(device=hidden.device, dtype=hidden.dtype)  # no-op when they already match
        return (shifted, *output[1:]) if isinstance(output, (tuple, list)) else shifted

    return hook


@contextlib.contextmanager
def steering(model: nn.Module, vectors: SteeringVectors, strength: float, *, layer_start: float = DEFAULT_LAYER_START,
             layer_end: float = DEFAULT_LAYER_END) -> Iterator[range]:
    """Add `strength * vectors[i]` to the output of each decoder layer i in the range; yields the layer range."""
    layers = decoder_layers(model)
    hidden_size = _unwrapped(model).config.get_text_config().hidden_size
    if tuple(vectors.vectors.shape) != (len(layers), hidden_size):
        raise UserError.single(vectors.source, "steering vectors",
                               f"shape {tuple(vectors.vectors.shape)} does not fit this model "
                               f"({len(layers)} layers x {hidden_size})",
                               "profile the same base model you steer (`character-baker profile`)")
    chosen = steering_layers(len(layers), layer_start, layer_end)
    weight = next(model.parameters())
    deltas = {i: (strength * vectors.vectors[i]).to(weight.device, weight.dtype) for i in chosen} if strength else {}
    handles = [layers[i].register_forward_hook(_add_hook(delta)) for i, delta in deltas.items()]
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


class SteeredBackend(GenerationBackend):
    """An in-process (HF) backend whose every generation runs with `strength` x the steering vectors added."""

    def __init__(self, inner: Any, vectors: SteeringVectors, strength: float, *,
                 layer_start: float = DEFAULT_LAYER_START, layer_end: float = DEFAULT_LAYER_END):
        if not isinstance(getattr(inner, "model", None), nn.Module):
            raise UserError.single("recipe", "generation.student.backend",
                                   f"the {inner.name} backend runs no in-process model to steer",
                                   "use the hf backend for steering")
        self.inner, self.vectors, self.strength = inner, vectors, strength
        self.layer_start, self.layer_end = layer_start, layer_end
        self.name, self.model_id, self.model = inner.name, inner.model_id, inner.model
        self.layers = steering_layers(len(decoder_layers(inner.model)), layer_start, layer_end)
        digest = hashlib.sha256(vectors.vectors.contiguous().numpy().tobytes()).hexdigest()[:16]
        self._steer_id = f"steered:{vectors.kind}:{digest}:{strength}:{self.layers.start}-{self.layers.stop}"

    def adapter_fingerprint(self, adapter: str | None) -> str:
        """The inner fingerprint, marked with the vectors, strength and layers (cached answers never mix)."""
        return f"{self._steer_id}:{self.inner.adapter_fingerprint(adapter)}"

    def generate(self, conversations: list[list[dict[str, str]]], sampling: Any, n: int = 1, *,
                 adapter: str | None = None, progress: Any = None) -> list[list[Any]]:
        """The inner backend's completions, generated under the steering hooks."""
        with steering(self.model, self.vectors, self.strength, layer_start=self.layer_start, layer_end=self.layer_end):
            return self.inner.generate(conversations, sampling, n, adapter=adapter, progress=progress)


def steered_backend(backend: Any, profile_dir: str | Path, cfg: SteerConfig) -> SteeredBackend:
    """The evaluation's steered condition: `backend` steered by the profile in `profile_dir` as `cfg` says."""
    vectors = load_steering(Path(profile_dir) / Path(PROFILE_FILE).name, cfg.vector)
    return SteeredBackend(backend, vectors, cfg.strength, layer_start=cfg.layer_start, layer_end=cfg.layer_end)


def strength_sweep(backend: Any, vectors: SteeringVectors, strengths: Sequence[float],
                   conversations: list[list[dict]], sampling: Any, *, layer_start: float = DEFAULT_LAYER_START,
                   layer_end: float = DEFAULT_LAYER_END) -> list[dict[str, Any]]:
    """Answers of an in-process (HF) backend to `conversations` at each strength: [{strength, layers, answers}]."""
    results = []
    for strength in strengths:
        steered = SteeredBackend(backend, vectors, strength, layer_start=layer_start, layer_end=layer_end)
        outputs = steered.generate(conversations, sampling)
        results.append({"strength": strength, "layers": [steered.layers.start, steered.layers.stop - 1],
                        "answers": [row[0].text for row in outputs]})
    return results
