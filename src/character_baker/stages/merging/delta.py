"""Delta-space arithmetic on LoRA adapters: exact weighted sums, folding, SVD re-factorisation.

A LoRA adapter changes each adapted linear layer's weight by  dW = s * B @ A  (A [r, in],
B [out, r], s its scaling: alpha / r, or alpha / sqrt(r) with rsLoRA). The persona is

    W = W0 + sum_i w_i * s_i * B_i @ A_i          (published: w_distill 1.0, w_introspect 0.25)

- Exact (`combine_exact`): per module the factors are stacked, B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]
  and A = [A_1; A_2; ...], so B @ A is the weighted sum above exactly, with no cross terms
  B_i @ A_j (PEFT calls this `cat`). Its rank is the sum of the adapters' ranks.
- Fold (`fold_into`): W <- W + scale * B @ A, computed in float32 and cast once to W's dtype.
- SVD (`truncate`): the best rank-k approximation of B @ A (Eckart-Young), computed from the
  factors without forming the [out, in] matrix: QR of B and of A^T, SVD of the small
  R_B @ R_A^T. The residual reported per module is ||dW - dW_k||_F / ||dW||_F, exact from the
  discarded singular values. At full rank the re-factorisation is exact.
- PEFT linear (`peft_linear`), for parity with published checkpoints only: PEFT's
  `add_weighted_adapter(combination_type="linear")` builds (sum_i sqrt(w_i s_i) B_i) @
  (sum_i sqrt(w_i s_i) A_i), which INCLUDES the cross terms sqrt(w_i s_i w_j s_j) B_i @ A_j
  (i != j): it is not the weighted sum of the adapters' deltas.

Supported adapters: plain LoRA on linear layers (no DoRA or other variants, no LoRA bias, no
fan_in_fan_out); anything else is refused with the adapter's name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from character_baker.core.errors import Problem, UserError
from character_baker.core.runs import canonical_adapter_config

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LowRank:
    """One module's delta dW = B @ A (B [out, k], A [k, in], float32); any scaling is already in B."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        """Inner dimension k."""
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense [out, in] delta (for tests and small checks; folding never needs it at once)."""
        return self.B @ self.A


Delta = dict[str, LowRank]  # module path in the base model (e.g. "model.layers.0.self_attn.q_proj") -> factors


# ----------------------------------------------------------------------------- reading adapters
def load_adapters(model: nn.Module, folders: dict[str, Path]) -> Any:
    """Wrap `model` in PEFT (inference mode) with every adapter folder loaded under its name."""
    from peft import PeftModel

    names = list(folders)
    peft_model = PeftModel.from_pretrained(model, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(folders[name]), adapter_name=name)
    return peft_model.eval()


def _unsupported(module: Any, adapter: str) -> str | None:
    from peft.tuners.lora.layer import Linear

    if not isinstance(module, Linear):
        return f"LoRA on a {type(module).__name__} layer"
    if module.lora_variant.get(adapter) is not None:
        return f"a LoRA variant ({type(module.lora_variant[adapter]).__name__}, e.g. DoRA)"
    if module.lora_bias.get(adapter, False) or module.fan_in_fan_out:
        return "lora_bias or fan_in_fan_out"
    return None


def adapter_factors(peft_model: Any, adapter: str) -> Delta:
    """Every module's (s * B, A) of one loaded adapter, in float32, keyed by its path in the base model."""
    from peft.tuners.lora import LoraLayer

    factors: Delta = {}
    for path, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or (adapter not in module.lora_A and adapter not in module.lora_embedding_A):
            continue
        problem = _unsupported(module, adapter)
        if problem:
            raise UserError([Problem(f"adapters/{adapter}", "adapter_config.json", f"{problem} cannot be merged "
                                     f"exactly ({path})", "train plain LoRA adapters on linear layers")])
        scaling = module.scaling[adapter]
        factors[path.removeprefix(PEFT_PREFIX)] = LowRank(
            B=module.lora_B[adapter].weight.detach().float() * scaling, A=module.lora_A[adapter].weight.detach().float())
    return factors


# ----------------------------------------------------------------------------- combining
def combine_exact(factors: dict[str, Delta], weights: dict[str, float]) -> Delta:
    """sum_i w_i * dW_i per module, as stacked factors (no cross terms); zero-weight adapters are left out."""
    combined: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        for path, low_rank in factors[name].items():
            combined.setdefault(path, []).append((low_rank.B * weight, low_rank.A))
    return {path: LowRank(torch.cat([b for b, _ in parts], dim=1), torch.cat([a for _, a in parts], dim=0))
            for path, parts in combined.items()}


def peft_linear(peft_model: Any, weights: dict[str, float], name: str = "persona_linear") -> Delta:
    """PEFT's `linear` combination (cross terms included; see the module docstring), as factors."""
    adapters = list(weights)
    peft_model.add_weighted_adapter(adapters, [weights[a] for a in adapters], name, combination_type="linear")
    try:
        return adapter_factors(peft_model, name)
    finally:
        peft_model.delete_adapter(name)


@torch.no_grad()
def fold_into(model: nn.Module, delta: Delta, scale: float = 1.0) -> None:
    """W <- W + scale * B @ A for every module of `delta` (float32 arithmetic, one cast to W's dtype)."""
    for path, low_rank in delta.items():
        weight = model.get_submodule(path).weight
        update = low_rank.B.to(weight.device) @ low_rank.A.to(weight.device)
        weight.copy_((weight.float() + scale * update).to(weight.dtype))


# ----------------------------------------------------------------------------- SVD
@dataclass(frozen=True)
class Residual:
    """How much of the delta a truncation dropped: relative Frobenius norms."""

    per_module: dict[str, float]
    overall: float

    @property
    def worst(self) -> float:
        """The largest per-module relative residual."""
        return max(self.per_module.values(), default=0.0)


def _svd_of_product(low_rank: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V with B @ A = U diag(S) V^T, from QR of the factors (float64 on the CPU)."""
    q_b, r_b = torch.linalg.qr(low_rank.B.detach().cpu().double())
    q_a, r_a = torch.linalg.qr(low_rank.A.detach().cpu().double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, q_a @ vh.T


def truncate(delta: Delta, rank: int) -> tuple[Delta, Residual]:
    """The best rank-`rank` factors of each module's delta (balanced sqrt(S) split) and the residual."""
    truncated: Delta = {}
    per_module: dict[str, float] = {}
    dropped_total = kept_total = 0.0
    for path, low_rank in delta.items():
        u, s, v = _svd_of_product(low_rank)
        k = min(rank, len(s))
        root = s[:k].sqrt()
        truncated[path] = LowRank((u[:, :k] * root).float(), (root[:, None] * v[:, :k].T).float())
        dropped, total = float((s[k:] ** 2).sum()), float((s ** 2).sum())
        per_module[path] = math.sqrt(dropped / total) if total > 0 else 0.0
        dropped_total, kept_total = dropped_total + dropped, kept_total + total
    overall = math.sqrt(dropped_total / kept_total) if kept_total > 0 else 0.0
    return truncated, Residual(per_module, overall)


# ----------------------------------------------------------------------------- writing a LoRA folder
def pad_rank(low_rank: LowRank, rank: int) -> LowRank:
    """The same delta with zero columns/rows added up to `rank`."""
    extra = rank - low_rank.rank
    if extra <= 0:
        return low_rank
    return LowRank(torch.cat([low_rank.B, low_rank.B.new_zeros(low_rank.B.shape[0], extra)], dim=1),
                   torch.cat([low_rank.A, low_rank.A.new_zeros(extra, low_rank.A.shape[1])], dim=0))


def write_lora(delta: Delta, folder: Path, *, base_model: str) -> int:
    """Write `delta` as a standard PEFT LoRA folder (scaling 1: lora_alpha = r, uniform r); return r."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from character_baker.backends.catalogue import atomic_folder

    rank = max((low_rank.rank for low_rank in delta.values()), default=1)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted({path.rsplit(".", 1)[-1] for path in delta}),
                        base_model_name_or_path=base_model)
    tensors = {}
    for path, low_rank in delta.items():
        padded = pad_rank(low_rank, rank)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = padded.A.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = padded.B.contiguous().cpu()
    with atomic_folder(folder) as staging:
        config.save_pretrained(str(staging))
        canonical_adapter_config(staging)
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    return rank


def adapter_rank(folder: Path) -> int:
    """The `r` of a PEFT adapter folder."""
    return int(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["r"])
