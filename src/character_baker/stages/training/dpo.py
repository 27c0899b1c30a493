"""DPO with LoRA: the distill stage's objective and its cached reference log-probs.

    loss = DPO + nll_coef * NLL(chosen) + kl_coef * KL_k3(chosen)      (terms: see `losses`)

The reference is the base model with the adapter disabled (never a second copy). Its per-token
log-probs of every chosen and rejected response are computed once, before training, under
no_grad, and cached in `adapters/<stage>/reference_logps.safetensors`, keyed by record id and a
hash of the tokens, with the base model's fingerprint in the file's metadata: a rerun (or a
resume) reuses every entry that still matches and computes only what is missing.

Chosen and rejected run in one forward: with `share_prompt` (the default) each pair is one row
whose prompt is computed once (prefix sharing, see `packing`; `pack_pairs` puts several pairs in
a row); otherwise rows [chosen..., rejected...] of one padded batch. Every layout gives the same
log-probs. The reference pass batches `REFERENCE_BATCH_FACTOR` micro-batches per forward and runs
eagerly (`eager_forward`): compiling its inference-mode graph took longer than the whole pass runs.
"""

from __future__ import annotations

import hashlib
import os
import time
from array import array
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from character_baker.core.config import DistillConfig
from character_baker.core.runs import RunDir, stable_hash
from character_baker.stages.training.batching import Batch, collate_sequences
from character_baker.stages.training.losses import (ResponseScorer, attention_implementation, dpo_loss, k3_kl,
                                                    row_sums, tokens_per_row)
from character_baker.stages.training.packing import (MASKABLE_ATTENTION, collate_shared_prefix, restore_attention,
                                                     sdpa_instead_of_flex, use_flex_attention)
from character_baker.stages.training.tokenize import TokenizedPair, tokenize_preferences
from character_baker.stages.training.trainer import ExtraLoss, run_training, sum_counts

REFERENCE_FILE = "reference_logps.safetensors"
# The reference pass keeps no activations for backward, so a batch this many times the training
# micro-batch fits in the memory training needs, and costs fewer, larger forwards.
REFERENCE_BATCH_FACTOR = 4


def reference_pairs_per_batch(micro_batch_size: int) -> int:
    """Pairs per forward of the reference log-prob pass, for a training micro-batch of `micro_batch_size` pairs."""
    return REFERENCE_BATCH_FACTOR * micro_batch_size


def pair_key(pair: TokenizedPair) -> str:
    """Cache key of a pair: its id and a hash of both tokenised sequences and masks."""
    digest = hashlib.sha256()
    for sequence in (pair.chosen, pair.rejected):
        digest.update(array("q", sequence.input_ids).tobytes() + b"|" + array("b", sequence.loss_mask).tobytes() + b"|")
    return f"{pair.id}:{digest.hexdigest()[:16]}"


def model_fingerprint(model: nn.Module) -> str:
    """Identifies the reference weights: model name/path, architecture config and dtype."""
    config = getattr(model, "config", None)
    described = config.to_dict() if config is not None else {}
    return stable_hash([getattr(config, "_name_or_path", ""), described, str(next(model.parameters()).dtype)])


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int, share_prompt: bool = False,
                  pack: bool = False) -> Batch:
    """One padded batch: prefix-shared rows (one pair each, or several with `pack`), or rows [chosen..., rejected...]."""
    if share_prompt:
        return collate_shared_prefix(pairs, pad_token_id, pack)
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)
    batch.ids = [pair.id for pair in pairs]
    return batch


def can_share_prompt(model: nn.Module) -> bool:
    """True when the model's attention takes the custom mask prefix sharing needs (SDPA, eager, flex)."""
    return attention_implementation(model) in MASKABLE_ATTENTION


def score_batch(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(token log-probs [chosen of each pair..., rejected of each pair...], trained tokens per sequence)."""
    if "segments" in batch.extras:
        extras = batch.extras
        token_logps, _ = model(batch.input_ids, batch.attention_mask, batch.loss_mask, extras["position_ids"],
                               extras["segments"], extras["gather"], extras["labels"],
                               host_input_ids=batch.host_input_ids)
        return token_logps, extras["row_tokens"]
    token_logps, _ = model(batch.input_ids, batch.attention_mask, batch.loss_mask, host_input_ids=batch.host_input_ids)
    return token_logps, tokens_per_row(batch.loss_mask)


def _unwrap(model: nn.Module) -> ResponseScorer:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _grad_free(model: nn.Module) -> Any:
    """Inference mode, or no_grad for an FSDP2 model: its unsharded parameters, allocated at the first
    all-gather, would be inference tensors that the training forwards then may not write into."""
    from torch.distributed.fsdp import FSDPModule

    return torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()


@contextmanager
def eager_forward(model: nn.Module) -> Iterator[None]:
    """Compiled layers run eagerly and flex attention as SDPA while the block runs: nothing compiles.

    A forward-only pass over the data runs once; `torch_compile` would trace and compile an
    inference-mode graph for it (another one for each new batch shape) that training, which needs
    the autograd graph, cannot reuse. On one H200 that compile was most of the reference pass's time
    (docs/performance.md). torch < 2.6 has no `set_stance`: there the layers compile as before.
    """
    stance = getattr(torch.compiler, "set_stance", None)
    with (stance("force_eager") if stance else nullcontext()), sdpa_instead_of_flex(_unwrap(model).model):
        yield


def score_pairs(model: nn.Module, pairs: Sequence[TokenizedPair], pad_token_id: int, batch_size: int,
                adapter: bool = True, share_prompt: bool = False,
                pack: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{pair_key: (chosen token log-probs, rejected token log-probs)} on the CPU, in eval and inference mode, eagerly."""
    scorer, was_training = _unwrap(model), model.training
    model.eval()
    scores = {}
    try:
        with eager_forward(model):
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                batch = collate_pairs(chunk, pad_token_id, share_prompt, pack).to(next(model.parameters()).device)
                with _grad_free(model), (nullcontext() if adapter else scorer.adapter_disabled()):
                    token_logps, counts = score_batch(model, batch)
                # Cloned outside inference mode: ordinary tensors, which the training loss may use.
                rows = token_logps.float().cpu().clone().split(counts.tolist())
                for index, pair in enumerate(chunk):
                    scores[pair_key(pair)] = (rows[index].clone(), rows[index + len(chunk)].clone())
    finally:
        model.train(was_training)
    return scores


def _read_cache(path: Path, fingerprint: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("fingerprint") != fingerprint:
            return {}
        keys = {name.rsplit("/", 1)[0] for name in handle.keys()}
        return {key: (handle.get_tensor(f"{key}/chosen"), handle.get_tensor(f"{key}/rejected")) for key in keys}


def _write_cache(path: Path, fingerprint: str, cache: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for key, (chosen, rejected) in cache.items():
        tensors[f"{key}/chosen"], tensors[f"{key}/rejected"] = chosen.contiguous(), rejected.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata={"fingerprint": fingerprint})
    os.replace(temporary, path)


def reference_logps(model: nn.Module, pairs: Sequence[TokenizedPair], path: Path, pad_token_id: int,
                    batch_size: int, share_prompt: bool = False, pack: bool = False
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Cached reference (adapter off) token log-probs of every pair, computing only missing ones; (cache, computed)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    fingerprint = model_fingerprint(_unwrap(model).model)
    cache = _read_cache(path, fingerprint)
    missing = sorted({pair_key(p): p for p in pairs if pair_key(p) not in cache}.values(), key=len)
    if not missing:
        return cache, 0
    # Every process scores the same number of batches (FSDP/DDP forwards are collective).
    batches = [missing[i:i + batch_size] for i in range(0, len(missing), batch_size)]
    rounds = -(-len(batches) // state.num_processes)
    mine = batches[state.process_index::state.num_processes]
    mine += [batches[0]] * (rounds - len(mine))
    scores = {}
    for batch in mine:
        scores.update(score_pairs(model, batch, pad_token_id, len(batch), adapter=False, share_prompt=share_prompt,
                                  pack=pack))
    if state.num_processes > 1:
        scores = dict(item for part in gather_object([scores]) for item in part.items())
    cache.update(scores)
    if state.is_main_process:
        _write_cache(path, fingerprint, cache)
    state.wait_for_everyone()
    return cache, len(missing)


@dataclass
class DpoObjective:
    """Sigmoid DPO + NLL on chosen + k3 per-token KL on chosen, against cached reference log-probs."""

    beta: float
    nll_coef: float
    kl_coef: float
    stage: str = "distill"
    reference_batch_size: int = 4
    share_prompt: bool = False
    pack_pairs: bool = False
    name: str = "dpo"
    _reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def counts(self, pair: TokenizedPair) -> dict[str, float]:
        """A pair counts once, and its chosen response tokens count toward the per-token means."""
        return {"pairs": 1.0, "chosen_tokens": float(pair.chosen.num_loss_tokens)}

    def prepare(self, model: nn.Module, dataset: Sequence[TokenizedPair], run_dir: RunDir) -> dict[str, Any]:
        """Load or compute the reference log-probs of every pair (adapter disabled, no grad)."""
        path = run_dir.path("adapters", self.stage, REFERENCE_FILE)
        started = time.perf_counter()
        # Padding sits right of every real token and is masked, so its id cannot change a log-prob.
        self._reference, computed = reference_logps(model, dataset, path, 0, self.reference_batch_size,
                                                    self.share_prompt, self.pack_pairs)
        return {"reference_file": str(path), "reference_computed": computed, "reference_reused": len(dataset) - computed,
                "reference_seconds": time.perf_counter() - started}

    def collate(self, pairs: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
        """Chosen and rejected rows in one batch, with the reference log-probs aligned to its trained tokens."""
        batch = collate_pairs(pairs, pad_token_id, self.share_prompt, self.pack_pairs)
        references = [self._reference[pair_key(pair)] for pair in pairs]
        batch.extras["ref_logps"] = torch.cat([c for c, _ in references] + [r for _, r in references])
        batch.counts = sum_counts([self.counts(pair) for pair in pairs])
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's contribution to the global-batch loss, and its metrics."""
        token_logps, counts = score_batch(model, batch)
        reference = batch.extras["ref_logps"]
        pairs = len(counts) // 2
        policy, ref = row_sums(token_logps, counts), row_sums(reference, counts)
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:],
                                                            self.beta)
        chosen_tokens = int(counts[:pairs].sum())
        total_pairs = batch.totals.get("pairs", batch.counts["pairs"])
        total_tokens = batch.totals.get("chosen_tokens", batch.counts["chosen_tokens"])
        dpo = losses.sum() / total_pairs
        nll = -token_logps[:chosen_tokens].sum() / total_tokens
        kl = k3_kl(token_logps[:chosen_tokens], reference[:chosen_tokens]).sum() / total_tokens
        loss = dpo + self.nll_coef * nll + self.kl_coef * kl
        metrics = {"dpo_loss": dpo, "nll_loss": nll, "kl": kl,
                   "reward_accuracy": (chosen_rewards > rejected_rewards).float().sum() / total_pairs,
                   "reward_margin": (chosen_rewards - rejected_rewards).sum() / total_pairs,
                   "chosen_reward": chosen_rewards.sum() / total_pairs,
                   "rejected_reward": rejected_rewards.sum() / total_pairs,
                   "chosen_logps": policy[:pairs].sum() / total_pairs,
                   "rejected_logps": policy[pairs:].sum() / total_pairs}
        return loss, metrics


def evaluate_pairs(model: nn.Module, tokenizer: Any, records: Sequence[dict], beta: float,
                   batch_size: int = 8) -> dict[str, float]:
    """Reward accuracy and margin of a PEFT model (adapter on vs off) on held-out distill records."""
    pairs, _ = tokenize_preferences(tokenizer, records, max_length=10**9)
    scorer = ResponseScorer(model)
    pad = tokenizer.pad_token_id or 0
    share = can_share_prompt(model)
    policy = score_pairs(scorer, pairs, pad, batch_size, adapter=True, share_prompt=share)
    reference = score_pairs(scorer, pairs, pad, batch_size, adapter=False, share_prompt=share)
    margins = []
    for pair in pairs:
        (pc, pr), (rc, rr) = policy[pair_key(pair)], reference[pair_key(pair)]
        margins.append(beta * ((pc.sum() - rc.sum()) - (pr.sum() - rr.sum())).item())
    return {"reward_accuracy": sum(m > 0 for m in margins) / len(margins), "reward_margin": sum(margins) / len(margins)}


def train_dpo(run_dir: RunDir, records: list[dict], model: nn.Module, tokenizer: Any, cfg: DistillConfig, *,
              stage: str = "distill", console: Any = None, extra_losses: Sequence[ExtraLoss] = (),
              callbacks: Sequence[Any] = (), base_model: str | None = None,
              monitor: Any = None) -> dict[str, Any]:
    """Train a LoRA adapter on distill records {id, messages, chosen, rejected} with DPO; return the summary."""
    pairs, dropped = tokenize_preferences(tokenizer, records, cfg.max_length)
    # The push/pull regulariser reads [rows, seq] activations of whole sequences: two-row layout.
    share = cfg.share_prompt and not extra_losses and can_share_prompt(model)
    objective = DpoObjective(beta=cfg.beta, nll_coef=cfg.nll_coef, kl_coef=cfg.kl_coef, stage=stage,
                             reference_batch_size=reference_pairs_per_batch(cfg.micro_batch_size), share_prompt=share,
                             pack_pairs=share and cfg.pack_pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    restore = use_flex_attention(model) if share else None  # GPU: block-sparse attention for the packed rows
    try:
        summary = run_training(run_dir, pairs, model, cfg, objective, stage=stage, pad_token_id=pad,
                               extra_losses=extra_losses, callbacks=callbacks, console=console, base_model=base_model,
                               monitor=monitor)
    finally:
        restore_attention(model, restore)
    return {**summary, "pairs": len(pairs), "dropped_too_long": dropped,
            "attention": "flex_attention" if restore else attention_implementation(model)}
