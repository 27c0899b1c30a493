"""The stage registry: names, functions, and what each stage's inputs hash covers."""

from __future__ import annotations

from character_baker.core.stage import Stage, StageContext, StageResult


def _prompts(ctx: StageContext) -> StageResult:
    from character_baker.stages.data import prompts

    return prompts.run(ctx)


def _distill_data(ctx: StageContext) -> StageResult:
    from character_baker.stages.data import distill_pairs

    return distill_pairs.run(ctx)


# The prompt writer's settings and the base model shape the generated questions, so they are inputs too.
PROMPTS = Stage("prompts", _prompts, recipe_sections=("prompts", "models", "generation"))
DISTILL_DATA = Stage("distill_data", _distill_data, recipe_sections=("models", "generation", "distill"),
                     upstream=("prompts",))

STAGES: dict[str, Stage] = {stage.name: stage for stage in (PROMPTS, DISTILL_DATA)}
