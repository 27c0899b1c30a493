"""The stage chain behind `train`: which stages a recipe's method runs, in order, and partial runs.

    prompts -> distill_data -> distill -> (profile) -> (sdft) -> introspect_data -> introspect -> merge -> calibrate -> eval

`method` picks the training stages: `distill` and `introspect` by default; `sdft` adds on-policy
self-distillation; `push_pull` adds the activation profile and switches the regulariser on in the
training stage named by `push_pull.stage`.
"""

from __future__ import annotations

from character_baker.core.config import Recipe
from character_baker.core.errors import UserError

ORDER = ("prompts", "distill_data", "distill", "profile", "sdft", "introspect_data", "introspect", "merge", "calibrate",
         "eval")
METHOD_STAGES = {
    "distill": ("prompts", "distill_data", "distill"),
    "introspect": ("introspect_data", "introspect"),
    "sdft": ("sdft",),
    "push_pull": ("profile",),
}
ALWAYS = ("merge", "eval")


def plan_stages(recipe: Recipe) -> list[str]:
    """The ordered stage names the recipe's method runs."""
    wanted = set(ALWAYS) | ({"calibrate"} if recipe.calibrate.enabled else set())
    for method in recipe.method:
        wanted.update(METHOD_STAGES[method])
    if "introspect" in recipe.method and "distill" not in recipe.method:
        raise UserError.single("<recipe>", "method", "introspect trains on top of the distilled model",
                               "add 'distill' to method, e.g. method: [distill, introspect]")
    return [name for name in ORDER if name in wanted]


def select_stages(planned: list[str], start: str | None = None, until: str | None = None,
                  only: list[str] | None = None) -> list[str]:
    """Apply --from/--until/--only to the planned stages, with a clear error for unknown names."""
    for flag, names in (("--from", [start] if start else []), ("--until", [until] if until else []),
                        ("--only", only or [])):
        for name in names:
            if name not in planned:
                raise UserError.single(flag, flag, f"'{name}' is not a stage of this recipe's chain",
                                       f"use one of: {', '.join(planned)}")
    if only:
        return [name for name in planned if name in only]
    first = planned.index(start) if start else 0
    last = planned.index(until) if until else len(planned) - 1
    if first > last:
        raise UserError.single("--from", "--from/--until", f"'{start}' comes after '{until}'",
                               "swap the two stage names")
    return planned[first:last + 1]


def with_push_pull(recipe: Recipe) -> Recipe:
    """The recipe with the regulariser switched on when the method asks for push_pull."""
    if "push_pull" not in recipe.method or recipe.push_pull.enabled:
        return recipe
    return recipe.model_copy(update={"push_pull": recipe.push_pull.model_copy(update={"enabled": True})})


# The stages a training subcommand (`distill`, `introspect`, `sdft`, `push-pull`) runs before its own.
COMMAND_PREREQUISITES = {"distill": ("prompts", "distill_data"), "introspect": ("introspect_data",),
                         "sdft": ("prompts",)}
PROFILE_CHAIN = ("prompts", "profile")


def needs_own_profile(recipe: Recipe, stage: str) -> bool:
    """True when push/pull is on for `stage` and reads this run's profile (so it must be built first)."""
    return recipe.push_pull_joins(stage) and recipe.push_pull.profile is None


def command_chain(recipe: Recipe, stage: str, *, data_only: bool = False, skip_data: bool = False) -> list[str]:
    """The stages `character-baker STAGE` runs, in order: this run's profile when push/pull needs it,
    the stage's data stages (unless `skip_data`), then the stage itself (unless `data_only`)."""
    if stage not in COMMAND_PREREQUISITES:
        raise UserError.single("recipe", "push_pull.stage", f"this version has no '{stage}' training stage to join",
                               f"use one of {', '.join(COMMAND_PREREQUISITES)}, e.g. --set push_pull.stage=sdft")
    names = list(PROFILE_CHAIN) if needs_own_profile(recipe, stage) else []
    if not skip_data:
        names += [name for name in COMMAND_PREREQUISITES[stage] if name not in names]
    if not data_only:
        names.append(stage)
    return names
