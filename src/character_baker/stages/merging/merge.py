"""The `merge` stage: combine the run's adapters into one persona (the arithmetic lives in `delta`).

    merge.mode = fold    exact weighted sum   -> adapters/persona/ (exact, rank = sum of ranks)
                                                 and model/ (full weights, standard HF folder)
    merge.mode = svd     exact sum truncated to merge.svd_rank by SVD -> adapters/persona/ (model/ emptied);
                         the relative residual (overall and worst module) is in the summary
    merge.mode = linear  PEFT's `linear` combination -> adapters/persona/ (model/ emptied), for parity with published
                         checkpoints; it includes cross terms B_i A_j (see `delta`)

`merge.weights` names the adapters (folders under adapters/) and their weights; published:
distill 1.0, introspect 0.25.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from character_baker.core.config import MergeConfig
from character_baker.core.errors import Problem, UserError
from character_baker.core.runs import ADAPTER_FILES, is_adapter_folder
from character_baker.core.stage import StageContext, StageResult
from character_baker.stages.merging.delta import (Delta, adapter_factors, adapter_rank, combine_exact, fold_into,
                                                  load_adapters, peft_linear, truncate, write_lora)
from character_baker.stages.merging.export import (PERSONA_ADAPTER, model_card, run_adapters,
                                                   write_hf_files)

MAKES = {"distill": "character-baker distill", "introspect": "character-baker introspect"}


def adapter_folders(ctx: StageContext) -> dict[str, Path]:
    """adapters/<name> for every adapter in merge.weights; every missing one reported with its fix."""
    weights = ctx.recipe.merge.weights
    problems = []
    if not any(weights.values()):
        problems.append(Problem("recipe", "merge.weights", f"no adapter has a non-zero weight ({weights}): the "
                                "persona would be the base model", "give at least one adapter a weight, e.g. "
                                "--weights distill=1.0,introspect=0.25"))
    folders = {}
    for name in weights:
        folder = ctx.run.path("adapters", name)
        if name == PERSONA_ADAPTER:
            problems.append(Problem("recipe", f"merge.weights.{name}", "'persona' is the merge's own output",
                                    "merge the adapters it was made from instead"))
        elif not is_adapter_folder(folder):
            make = MAKES.get(name, f"the stage that writes adapters/{name}")
            problems.append(Problem(str(folder), f"merge.weights.{name}", f"this run has no {name} adapter",
                                    f"run `{make}` on this run first, or leave it out of --weights"))
        folders[name] = folder
    if problems:
        raise UserError(problems)
    return folders


def persona_delta(peft_model: Any, cfg: MergeConfig) -> tuple[Delta, dict[str, Any]]:
    """The persona's per-module factors for the configured mode, and what to report about them."""
    if cfg.mode == "linear":
        ranks = {name: peft_model.peft_config[name].r for name in cfg.weights}
        if len(set(ranks.values())) > 1:
            raise UserError.single("recipe", "merge.mode", f"PEFT's linear combination needs equal ranks, got {ranks}",
                                   "use --mode fold or --mode svd (exact for any ranks)")
        return peft_linear(peft_model, cfg.weights), {"cross_terms": "included (PEFT linear)"}
    exact = combine_exact({name: adapter_factors(peft_model, name) for name in cfg.weights}, cfg.weights)
    if cfg.mode == "fold":
        return exact, {"cross_terms": "none (exact)"}
    truncated, residual = truncate(exact, cfg.svd_rank)
    return truncated, {"cross_terms": "none (exact before truncation)", "svd_rank": cfg.svd_rank,
                       "residual_overall": round(residual.overall, 6), "residual_worst_module": round(residual.worst, 6)}


def write_persona(ctx: StageContext, weights: dict[str, float]) -> tuple[list[str], dict[str, Any]]:
    """Combine the adapters at `weights` into adapters/persona/ (and model/ when folding); (artifacts, summary)."""
    from character_baker.backends.catalogue import atomic_folder
    from character_baker.backends.models import load_model

    cfg = ctx.recipe.merge.model_copy(update={"weights": dict(weights)})
    folders = adapter_folders(ctx)
    model, tokenizer = load_model(ctx.recipe.models.base, ctx.recipe.models)
    peft_model = load_adapters(model, folders)
    delta, details = persona_delta(peft_model, cfg)
    base = peft_model.unload()
    persona = f"adapters/{PERSONA_ADAPTER}"
    rank = write_lora(delta, ctx.run.path(persona), base_model=ctx.recipe.models.base)
    artifacts = [f"{persona}/{name}" for name in ADAPTER_FILES]
    # Full weights only when folding; an earlier fold's model/ would no longer match the persona: emptied.
    with atomic_folder(ctx.run.path("model")) as staging:
        if cfg.mode == "fold":
            fold_into(base, delta)
            write_hf_files(base, tokenizer, staging, model_card(ctx, run_adapters(ctx.run)))
            artifacts.append("model")
    summary = {"mode": cfg.mode, "weights": dict(cfg.weights),
               "adapter_ranks": {name: adapter_rank(folder) for name, folder in folders.items()},
               "persona_rank": rank, "modules": len(delta), **details}
    return artifacts, summary


def run(ctx: StageContext) -> StageResult:
    """Combine the adapters of merge.weights into adapters/persona/ (and model/ when folding)."""
    artifacts, summary = write_persona(ctx, ctx.recipe.merge.weights)
    return StageResult("merge", artifacts=artifacts, summary=summary)
