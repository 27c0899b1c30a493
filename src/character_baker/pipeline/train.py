"""`train`: run the stage chain for one constitution, or a batch of them, and summarise.

    plan = plan_run(ctx, start, until, only)      # which stages run or skip, counts, estimates
    results = run_chain(ctx, plan.stages)         # each stage via run_stage (skip/resume)
    batch = run_batch(paths, build_ctx)           # one after another, shared model cache
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from character_baker.core.errors import UserError
from character_baker.core.runs import adapter_hash
from character_baker.core.stage import StageContext
from character_baker.pipeline.chain import plan_stages, select_stages
from character_baker.pipeline.runner import missing_artifacts, run_stage, stage_inputs_hash
from character_baker.pipeline.stages import STAGES

# Throughputs measured by benchmarks/ (RESULTS.md) for a 135M-parameter model; scaled by model size.
REFERENCE_PARAMS = 135e6
RATES = {"cuda": {"generate": 30_000.0, "train": 40_000.0}, "cpu": {"generate": 40.0, "train": 30.0}}
ANSWER_FILL = 0.6  # share of max_new_tokens an average answer uses


def merge_weights_for_chain(ctx: StageContext, trained: list[str]) -> dict[str, float]:
    """merge.weights limited to the adapters this chain trains (sdft joins at weight 1.0 unless set)."""
    weights = {name: w for name, w in ctx.recipe.merge.weights.items() if name in trained}
    if "sdft" in trained and "sdft" not in weights:
        weights["sdft"] = 1.0
    return weights


def prepare_stage_options(name: str, ctx: StageContext, planned: list[str]) -> None:
    """Set the options a stage's command would set, right before it runs (adapters exist by then)."""
    if name in ("introspect_data", "introspect"):
        ctx.options["distill_adapter"] = adapter_hash(ctx.run.path("adapters", "distill"))
    elif name in ("merge", "calibrate"):
        trained = [stage for stage in ("distill", "introspect", "sdft") if stage in planned]
        ctx.recipe.merge.weights = merge_weights_for_chain(ctx, trained)
        ctx.options["adapters"] = {n: adapter_hash(ctx.run.path("adapters", n)) for n in ctx.recipe.merge.weights}
    elif name == "eval":
        from character_baker.stages.evaluation.stage import inputs_fingerprint

        options = {"adapters": {}, "models": {}, "prompt_files": [], "lm_eval": None, "with_runs": []}
        ctx.options.update(options, fingerprint=inputs_fingerprint(ctx.run, options))


@dataclass
class StageOutcome:
    """One stage of a train run: ran or skipped, wall time, tokens."""

    name: str
    status: str
    seconds: float = 0.0
    tokens_generated: int = 0
    tokens_trained: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


def run_chain(ctx: StageContext, stages: list[str], planned: list[str], force: bool = False,
              on_stage: Callable[[StageOutcome], None] | None = None,
              on_start: Callable[[str], None] | None = None) -> list[StageOutcome]:
    """Run the stages in order (skipping unchanged ones); release generation models before training."""
    outcomes = []
    for name in stages:
        if on_start:
            on_start(name)
        prepare_stage_options(name, ctx, planned)
        if name in ("distill", "introspect", "sdft", "merge"):
            release_generation_models(ctx)
        started = time.perf_counter()
        result, entry = run_stage(STAGES[name], ctx, force=force)
        outcome = StageOutcome(name, "ran" if result is not None else "skipped", time.perf_counter() - started,
                               entry.get("tokens_generated", 0), entry.get("tokens_trained", 0), entry.get("summary", {}))
        outcomes.append(outcome)
        if on_stage:
            on_stage(outcome)
    return outcomes


def release_generation_models(ctx: StageContext) -> None:
    """Before training, drop in-process vLLM engines (they reserve most GPU memory); hf models stay shared."""
    gen = ctx.recipe.generation
    roles = [gen.teacher, gen.student, gen.prompt_writer, gen.judge, gen.introspector]
    if not ctx.shared or not any(role is not None and role.backend == "vllm" for role in roles):
        return
    ctx.shared.clear()
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ----------------------------------------------------------------------------- plan / dry run
@dataclass
class Plan:
    """What a train run will do: stages to run or skip, counts, token and time estimates."""

    stages: list[str]
    planned: list[str]
    actions: dict[str, str]
    counts: dict[str, int]
    tokens_generate: int
    tokens_train: int
    device: str
    params: float
    seconds: float
    warnings: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def shown_counts(self) -> dict[str, int]:
        """The counts of the planned stages only (no introspection counts when the method has none)."""
        return {key: value for key, value in self.counts.items()
                if COUNT_STAGES.get(key) is None or COUNT_STAGES[key] in self.planned}


COUNT_STAGES = {"distill_samples": "distill_data", "distill_pairs": "distill", "reflections": "introspect_data",
                "interactions": "introspect_data", "eval_prompts": "eval"}  # count -> the stage it sizes


def estimate_counts(ctx: StageContext) -> dict[str, int]:
    """Prompt and sample counts implied by the constitution and recipe."""
    recipe = ctx.recipe
    prompts = len(ctx.constitution.traits) * recipe.prompts.questions_per_trait + recipe.prompts.general_prompts \
        + recipe.prompts.synthesized_prompts + recipe.prompts.checkable_prompts
    conversations = int(prompts * (1 + recipe.distill.prefill_fraction))
    return {"prompts": prompts, "distill_samples": conversations * (recipe.distill.best_of + recipe.distill.samples_per_prompt),
            "distill_pairs": conversations * recipe.distill.samples_per_prompt,
            "reflections": 10 * recipe.introspect.reflections_per_instruction,
            "interactions": recipe.introspect.interactions, "eval_prompts": recipe.eval.prompts}


def stage_tokens(ctx: StageContext, counts: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(tokens to generate, tokens to train on) per stage, from the planned counts."""
    gen = ctx.recipe.generation
    answer = int(gen.teacher.sampling.max_new_tokens * ANSWER_FILL)
    student_answer = int(gen.student.sampling.max_new_tokens * ANSWER_FILL)
    introspection = (counts["reflections"] + counts["interactions"] * (ctx.recipe.introspect.turns - 1)) * student_answer
    calibrate = ctx.recipe.calibrate
    return {"distill_data": (counts["distill_samples"] * answer, 0),
            "distill": (0, counts["distill_pairs"] * 2 * (answer + 60)),
            "introspect_data": (introspection, 0), "introspect": (0, introspection),
            "sdft": (ctx.recipe.sdft.prompts * student_answer, 2 * ctx.recipe.sdft.prompts * (student_answer + 60)),
            "calibrate": ((len(calibrate.scales) + 1) * calibrate.prompts * calibrate.max_new_tokens, 0),
            "eval": (counts["eval_prompts"] * 6 * student_answer, 0)}


def estimate_tokens(ctx: StageContext, counts: dict[str, int], stages: list[str]) -> tuple[int, int]:
    """(tokens to generate, tokens to train on) for the stages that will run."""
    per_stage = stage_tokens(ctx, counts)
    return (sum(per_stage.get(s, (0, 0))[0] for s in stages), sum(per_stage.get(s, (0, 0))[1] for s in stages))


def stage_seconds(ctx: StageContext, counts: dict[str, int], device: str, params: float) -> dict[str, float]:
    """A rough time per stage on this machine (rates from benchmarks/, scaled by model size; 10 s floor)."""
    scale = REFERENCE_PARAMS / params
    rates = RATES[device]
    return {name: 10.0 + generate / (rates["generate"] * scale) + train / (rates["train"] * scale)
            for name, (generate, train) in stage_tokens(ctx, counts).items()}


def model_size(ctx: StageContext) -> float:
    """Parameter count of the base model from its files, or the 135M reference when it is not local yet."""
    from character_baker.backends.models import model_info

    try:
        return float(model_info(ctx.recipe.models.base)["parameters"])
    except (UserError, KeyError, OSError, ValueError):
        return REFERENCE_PARAMS


def plan_run(ctx: StageContext, start: str | None = None, until: str | None = None,
             only: list[str] | None = None, force: bool = False) -> Plan:
    """The plan `train --dry-run` prints."""
    import torch

    planned = plan_stages(ctx.recipe)
    stages = select_stages(planned, start, until, only)
    actions, upstream_changes = {}, False
    for name in stages:
        prepare_stage_options(name, ctx, planned)  # the same options the run will hash
        current = (not force and not upstream_changes
                   and ctx.run.is_stage_current(name, stage_inputs_hash(STAGES[name], ctx))
                   and not missing_artifacts(ctx, name))
        actions[name] = "skip (inputs unchanged)" if current else "run"
        upstream_changes |= not current
    counts = estimate_counts(ctx)
    to_run = [name for name in stages if actions[name] == "run"]
    generate, train = estimate_tokens(ctx, counts, to_run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = model_size(ctx)
    per_stage = stage_seconds(ctx, counts, device, params)
    estimates = {name: (per_stage.get(name, 10.0) if actions[name] == "run" else 0.0) for name in stages}
    return Plan(stages, planned, actions, counts, generate, train, device, params, sum(estimates.values()),
                thin_data_warnings(ctx, counts, to_run), estimates)


def thin_data_warnings(ctx: StageContext, counts: dict[str, int], stages: list[str]) -> list[str]:
    """One line per training stage whose planned examples (before any filter) cannot fill one batch."""
    recipe = ctx.recipe
    planned = {"distill": (int(counts["distill_pairs"] * (1 - recipe.distill.heldout_fraction)), "pairs"),
               "introspect": (counts["reflections"] + counts["interactions"], "introspection examples"),
               "sdft": (recipe.sdft.prompts, "prompts")}
    warnings = []
    for stage, (count, what) in planned.items():
        cfg = getattr(recipe, stage)
        if stage in stages and count < cfg.batch_size:
            action = ("the batch will shrink to fit" if cfg.shrink_batch_to_data
                      else f"the stage will stop ({stage}.shrink_batch_to_data is off)")
            warnings.append(f"{stage}: at most {count} {what} planned (before filters) for {stage}.batch_size "
                            f"{cfg.batch_size}: {action}; raise the data sizes or lower {stage}.batch_size")
    return warnings


# ----------------------------------------------------------------------------- batch
@dataclass
class CharacterResult:
    """One character of a batch: ok or failed, the run folder, stage outcomes, error."""

    constitution: str
    ok: bool
    run: str = ""
    seconds: float = 0.0
    outcomes: list[StageOutcome] = field(default_factory=list)
    error: str = ""


def run_batch(paths: list[Path], run_one: Callable[[Path, dict], tuple[StageContext, list[StageOutcome]]],
              log: Callable[[str], None] = print) -> list[CharacterResult]:
    """Train each constitution in turn, sharing loaded models, continuing past failures."""
    shared: dict[str, Any] = {}
    results = []
    for path in paths:
        started = time.perf_counter()
        try:
            ctx, outcomes = run_one(path, shared)
            results.append(CharacterResult(str(path), True, str(ctx.run.root), time.perf_counter() - started, outcomes))
        except UserError as error:
            results.append(CharacterResult(str(path), False, seconds=time.perf_counter() - started, error=str(error)))
            log(f"[batch] {path}: failed: {error}")
        except Exception as error:  # noqa: BLE001 - one character's crash must not stop the batch
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            results.append(CharacterResult(str(path), False, seconds=time.perf_counter() - started, error=detail))
            log(f"[batch] {path}: failed: {detail}")
    return results


def expand_constitution_paths(items: list[Path]) -> list[Path]:
    """Files as given; folders expand to their *.yaml / *.yml files (sorted)."""
    paths: list[Path] = []
    for item in items:
        if item.is_dir():
            found = sorted(list(item.glob("*.yaml")) + list(item.glob("*.yml")))
            if not found:
                raise UserError.single(str(item), "CONSTITUTION", "this folder holds no .yaml constitutions",
                                       "pass constitution files or a folder of them")
            paths.extend(found)
        else:
            paths.append(item)
    return paths
