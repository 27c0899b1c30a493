"""LoRA SFT on the distilled model: the `introspect` stage's training half.

    loss = mean over the optimiser batch's assistant tokens of -log p(token)

Every assistant turn of a (multi-turn) transcript is trained on, its end-of-turn token
included; system and user turns only give context (see `tokenize`). The mean is over all
assistant tokens of the global batch, so micro-batching and processes do not change it.

The model trained is the distilled model: the base with adapters/distill folded into its
weights (in memory), with a fresh LoRA on top. The loop, data order, checkpoints, resume and
logs are the shared trainer's (`trainer.run_training`), exactly as for distill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from character_baker.core.config import ModelsConfig, TrainingConfig
from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.core.stage import StageContext, StageResult
from character_baker.stages.training.batching import Batch, collate_sequences
from character_baker.stages.training.push_pull import balance_callbacks, push_pull_losses
from character_baker.core.heldout import held_out_prompts
from character_baker.core.persona_scorer import RUN_FILE as SCORER_FILE
from character_baker.stages.training.monitor import build_monitor, recorded_base_looping
from character_baker.stages.training.tokenize import TokenizedSequence, tokenize_conversations
from character_baker.stages.training.trainer import ExtraLoss, run_training, sum_counts, training_summary

INTROSPECTION_FILE = "data/introspection.jsonl"
DISTILL_ADAPTER = ("adapters", "distill")
STAGE = "introspect"


@dataclass
class SftObjective:
    """Next-token NLL on the trained (assistant) tokens, averaged over the global batch's trained tokens."""

    name: str = "sft"

    def counts(self, sequence: TokenizedSequence) -> dict[str, float]:
        """A sequence counts once; its assistant tokens count toward the per-token mean."""
        return {"sequences": 1.0, "tokens": float(sequence.num_loss_tokens)}

    def prepare(self, model: nn.Module, dataset: Sequence[TokenizedSequence], run_dir: RunDir) -> dict[str, Any]:
        """Nothing to precompute: SFT has no reference model."""
        return {}

    def collate(self, sequences: Sequence[TokenizedSequence], pad_token_id: int) -> Batch:
        """Right-padded sequences with their assistant-turn loss masks."""
        batch = collate_sequences(sequences, pad_token_id)
        batch.counts = sum_counts([self.counts(sequence) for sequence in sequences])
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the global-batch mean NLL."""
        token_logps, _ = model(batch.input_ids, batch.attention_mask, batch.loss_mask)
        total_tokens = batch.totals.get("tokens", batch.counts["tokens"])
        nll = -token_logps.sum() / total_tokens
        return nll, {"nll_loss": nll}


def train_sft(run_dir: RunDir, records: list[dict], model: nn.Module, tokenizer: Any, cfg: TrainingConfig, *,
              stage: str = STAGE, console: Any = None, extra_losses: Sequence[ExtraLoss] = (),
              callbacks: Sequence[Any] = (), base_model: str | None = None, monitor: Any = None) -> dict[str, Any]:
    """Train a LoRA adapter on transcripts {id, messages} (every assistant turn trained); return the summary."""
    sequences, dropped = tokenize_conversations(tokenizer, records, cfg.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    summary = run_training(run_dir, sequences, model, cfg, SftObjective(), stage=stage, pad_token_id=pad,
                           extra_losses=extra_losses, callbacks=callbacks, console=console, base_model=base_model,
                           monitor=monitor)
    return {**summary, "sequences": len(sequences), "dropped_too_long": dropped}


def load_distilled_model(run_dir: RunDir, models: ModelsConfig) -> tuple[nn.Module, Any]:
    """(base model with adapters/distill folded into its weights, tokenizer); UserError when the adapter is missing."""
    from peft import PeftModel

    from character_baker.backends.models import load_model

    folder = run_dir.path(*DISTILL_ADAPTER)
    if not (folder / "adapter_config.json").is_file():
        raise UserError.single(str(folder), "/".join(DISTILL_ADAPTER), "this run has no distilled adapter",
                               "run `character-baker distill CONSTITUTION --run RUN` first")
    model, tokenizer = load_model(models.base, models)
    distilled = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return distilled, tokenizer


def introspect_monitor(ctx: StageContext, tokenizer: Any) -> Any:
    """The introspect stage's monitor: distill's held-out prompts, judged against the base model's looping."""
    distill, student = ctx.recipe.distill, ctx.recipe.generation.student
    cfg = ctx.recipe.introspect.monitor
    monitor = build_monitor(cfg, held_out_prompts(ctx.run, distill.heldout_fraction, distill.seed, cfg.prompts),
                            tokenizer, ctx.run.path("adapters", STAGE), ctx.run.path(SCORER_FILE), student.sampling,
                            student.batch_size)
    if monitor is not None:
        monitor.base_reference = recorded_base_looping(ctx.run.path("adapters", "distill"))
    return monitor


def run(ctx: StageContext) -> StageResult:
    """SFT a LoRA on data/introspection.jsonl on top of the distilled model; write adapters/introspect/."""
    records = read_jsonl(ctx.run.path(INTROSPECTION_FILE))
    if not records:
        raise UserError.single(str(ctx.run.path(INTROSPECTION_FILE)), "introspect", "no introspection data to train on",
                               "generate it with `character-baker introspect` (every example may have been filtered: "
                               "see data/introspection.filtered.jsonl)")
    model, tokenizer = load_distilled_model(ctx.run, ctx.recipe.models)
    regularisers = push_pull_losses(ctx.recipe, ctx.run, STAGE)
    result = train_sft(ctx.run, records, model, tokenizer, ctx.recipe.introspect, console=ctx.console,
                       extra_losses=regularisers, callbacks=balance_callbacks(regularisers),
                       base_model=ctx.recipe.models.base, monitor=introspect_monitor(ctx, tokenizer))
    final = result["final_metrics"]
    summary = {"examples": result["sequences"], "dropped_too_long": result["dropped_too_long"],
               **training_summary(result), "final_loss": round(final["loss"], 4) if "loss" in final else None}
    adapter = f"adapters/{STAGE}"
    return StageResult(STAGE, artifacts=[f"{adapter}/adapter_config.json", f"{adapter}/adapter_model.safetensors"],
                       summary=summary, tokens_trained=result["tokens_trained"])
