"""The `distill` stage's training half: LoRA DPO on data/distill.jsonl, checked on held-out prompts.

A `heldout_fraction` of prompts (all of their pairs) never reaches training; after training the
adapter's reward accuracy and margin on them are measured (policy = adapter on, reference =
adapter off) and recorded in the stage summary.
"""

from __future__ import annotations

from typing import Any

from character_baker.core.errors import UserError
from character_baker.core.runs import read_jsonl
from character_baker.core.stage import StageContext, StageResult
from character_baker.stages.training.dpo import evaluate_pairs, train_dpo
from character_baker.stages.training.push_pull import balance_callbacks, push_pull_losses
from character_baker.core.heldout import held_out_prompts, split_heldout
from character_baker.core.persona_scorer import RUN_FILE as SCORER_FILE
from character_baker.stages.training.monitor import build_monitor
from character_baker.stages.training.trainer import training_summary

DISTILL_FILE = "data/distill.jsonl"
STAGE = "distill"


def heldout_metrics(ctx: StageContext, heldout: list[dict], adapter_path: str) -> dict[str, Any]:
    """Reward accuracy and margin of the trained adapter on held-out pairs."""
    if not heldout:
        return {}
    from peft import PeftModel

    from character_baker.backends.models import load_model

    base, tokenizer = load_model(ctx.recipe.models.base, ctx.recipe.models)
    model = PeftModel.from_pretrained(base, adapter_path).eval()
    metrics = evaluate_pairs(model, tokenizer, heldout, ctx.recipe.distill.beta,
                             batch_size=ctx.recipe.distill.micro_batch_size)
    return {"heldout_pairs": len(heldout), "heldout_reward_accuracy": round(metrics["reward_accuracy"], 4),
            "heldout_reward_margin": round(metrics["reward_margin"], 4)}


def run(ctx: StageContext) -> StageResult:
    """Train adapters/distill with DPO (+ NLL + KL, + push/pull when on) and measure it on held-out prompts."""
    from character_baker.backends.models import load_model

    cfg = ctx.recipe.distill
    records = read_jsonl(ctx.run.path(DISTILL_FILE))
    if not records:
        raise UserError.single(str(ctx.run.path(DISTILL_FILE)), "distill", "no distillation pairs to train on",
                               "build them with `character-baker distill CONSTITUTION --data-only` (every pair may "
                               "have been filtered: see data/distill.filtered.jsonl and distill.filters)")
    train, heldout = split_heldout(records, cfg.heldout_fraction, cfg.seed)
    model, tokenizer = load_model(ctx.recipe.models.base, ctx.recipe.models)
    regularisers = push_pull_losses(ctx.recipe, ctx.run, STAGE)
    student = ctx.recipe.generation.student
    monitor = build_monitor(cfg.monitor, held_out_prompts(ctx.run, cfg.heldout_fraction, cfg.seed, cfg.monitor.prompts),
                            tokenizer, ctx.run.path("adapters", STAGE), ctx.run.path(SCORER_FILE), student.sampling,
                            student.batch_size)
    result = train_dpo(ctx.run, train, model, tokenizer, cfg, stage=STAGE, console=ctx.console,
                       extra_losses=regularisers, callbacks=balance_callbacks(regularisers),
                       base_model=ctx.recipe.models.base, monitor=monitor)
    final = result["final_metrics"]
    summary = {"pairs": result["pairs"], "dropped_too_long": result["dropped_too_long"], **training_summary(result),
               **{key: round(value, 4) for key, value in final.items() if isinstance(value, float)},
               **heldout_metrics(ctx, heldout, str(result["adapter_path"]))}
    adapter = f"adapters/{STAGE}"
    return StageResult(STAGE, artifacts=[f"{adapter}/adapter_config.json", f"{adapter}/adapter_model.safetensors"],
                       summary=summary, tokens_trained=result["tokens_trained"])
