"""The stage registry: names, functions, and what each stage's inputs hash covers."""

from __future__ import annotations

from character_baker.core.stage import Stage, StageContext, StageResult


def _prompts(ctx: StageContext) -> StageResult:
    from character_baker.stages.data import prompts

    return prompts.run(ctx)


def _distill_data(ctx: StageContext) -> StageResult:
    from character_baker.stages.data import distill_pairs

    return distill_pairs.run(ctx)


def _distill(ctx: StageContext) -> StageResult:
    from character_baker.stages.training import distill_stage

    return distill_stage.run(ctx)


def _introspect_data(ctx: StageContext) -> StageResult:
    from character_baker.stages.data import introspection

    return introspection.run(ctx)


def _introspect(ctx: StageContext) -> StageResult:
    from character_baker.stages.training import sft

    return sft.run(ctx)


def _merge(ctx: StageContext) -> StageResult:
    from character_baker.stages.merging import merge

    return merge.run(ctx)


def _merge_sweep(ctx: StageContext) -> StageResult:
    from character_baker.stages.merging import sweep

    return sweep.run(ctx)


def _calibrate(ctx: StageContext) -> StageResult:
    from character_baker.stages.merging import calibrate

    return calibrate.run(ctx)


def _eval(ctx: StageContext) -> StageResult:
    from character_baker.stages.evaluation import stage

    return stage.run(ctx)


# The prompt writer's settings and the base model shape the generated questions, so they are inputs too.
PROMPTS = Stage("prompts", _prompts, recipe_sections=("prompts", "models", "generation"))
DISTILL_DATA = Stage("distill_data", _distill_data, recipe_sections=("models", "generation", "distill"),
                     upstream=("prompts",))
# The push/pull regulariser (when on) reads profile/, so the profile's artifacts are inputs too.
DISTILL = Stage("distill", _distill, recipe_sections=("models", "distill", "push_pull"),
                upstream=("distill_data", "profile"))
# The files eval reads (adapters, model/, profile/, extra adapters/models) are covered by the `fingerprint` option.
EVAL = Stage("eval", _eval, recipe_sections=("models", "generation", "eval", "steer", "distill"),
             upstream=("distill_data",), option_keys=("adapters", "models", "prompt_files", "lm_eval", "with_runs",
                                                      "fingerprint"))

# Adapter files are covered by the `distill_adapter` / `adapters` fingerprints the commands pass.
INTROSPECT_DATA = Stage("introspect_data", _introspect_data, recipe_sections=("models", "generation", "introspect"),
                        upstream=("distill",), option_keys=("distill_adapter",))
INTROSPECT = Stage("introspect", _introspect, recipe_sections=("models", "introspect", "push_pull"),
                   upstream=("distill", "introspect_data", "profile"), option_keys=("distill_adapter",))
MERGE = Stage("merge", _merge, recipe_sections=("models", "merge"), upstream=("distill", "introspect"),
              option_keys=("adapters",))
# The held-out prompts come from distill's split, so distill's settings are inputs too.
CALIBRATE = Stage("calibrate", _calibrate, recipe_sections=("models", "merge", "calibrate", "generation", "distill"),
                  upstream=("merge",), option_keys=("adapters",))
MERGE_SWEEP = Stage("merge_sweep", _merge_sweep, recipe_sections=("models", "merge"), upstream=("merge",),
                    option_keys=("adapters", "scales", "sweep_prompts", "sweep_tokens"))


def _profile(ctx: StageContext) -> StageResult:
    from character_baker.stages.profiling import profile

    return profile.run(ctx)


def _sdft(ctx: StageContext) -> StageResult:
    from character_baker.stages.training import sdft

    return sdft.run(ctx)


PROFILE = Stage("profile", _profile, recipe_sections=("models", "generation", "profile"), upstream=("prompts",))
# The push/pull regulariser (when on) reads profile/, so the profile's artifacts are inputs too.
SDFT = Stage("sdft", _sdft, recipe_sections=("models", "generation", "sdft", "push_pull"), upstream=("prompts", "profile"))

STAGES: dict[str, Stage] = {stage.name: stage for stage in (PROMPTS, DISTILL_DATA, DISTILL, EVAL, INTROSPECT_DATA, INTROSPECT,
                                                            MERGE, CALIBRATE, MERGE_SWEEP, PROFILE, SDFT)}
