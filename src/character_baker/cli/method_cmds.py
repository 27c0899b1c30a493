"""`profile`, `push-pull`, `sdft` and `steer`: the activation-level methods.

    character-baker profile constitutions/pirate.yaml                 # -> profile/ (tensors, summary, heatmap)
    character-baker push-pull constitutions/pirate.yaml               # the push_pull.stage trainer + regulariser
    character-baker sdft constitutions/pirate.yaml                    # on-policy self-distillation -> adapters/sdft/
    character-baker steer constitutions/pirate.yaml --strengths 0,2,4,8 --prompt "Who are you?"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from character_baker.cli.common import ModelOption, PresetOption, RecipeOption, SetOption, console, parse_number_list
from character_baker.cli.stage_cmds import (ConstitutionArg, ForceOption, RunOption, build_context, run_command_chain,
                                            run_stages)

PROFILE_STAGES = ["prompts", "profile"]
ShowOption = typer.Option(5, "--show", min=0, help="Held-out prompts answered (no system prompt) after training.")


# ----------------------------------------------------------------------------- shared pieces
def held_out_prompts(count: int) -> list[str]:
    """`count` prompts from the shipped evaluation set (never trained on), across categories."""
    from character_baker.core import assets
    from character_baker.stages.profiling.profile import draw_prompts

    return [record["prompt"] for record in draw_prompts(assets.eval_prompts(), count, seed=0)]


def print_answers(title: str, prompts: list[str], answers: list[str]) -> None:
    """Prompt / answer pairs under a title."""
    console.print(f"[bold]{title}[/]")
    for prompt, answer in zip(prompts, answers):
        console.print(f"  > {prompt}", markup=False, soft_wrap=True)
        console.print(f"    {answer.strip() or '(empty)'}", markup=False, soft_wrap=True)


def print_profile(ctx: Any) -> None:
    """The profile's per-layer table and where its files are."""
    import json

    from character_baker.stages.profiling import report

    summary = json.loads(ctx.run.path(report.SUMMARY_FILE).read_text(encoding="utf-8"))
    console.print(report.profile_table(summary))
    console.print(f"top layers: {summary['top_layers']}  push dims: {summary['push_dims']}  "
                  f"pull dims: {summary['pull_dims']}", markup=False)
    for name in report.ARTIFACTS:
        console.print(f"{name.split('/')[-1]}: {ctx.run.path(name)}", markup=False)


# ----------------------------------------------------------------------------- profile
def profile(constitution: Path = ConstitutionArg, run: Optional[Path] = RunOption,
            preset: Optional[str] = PresetOption, recipe: Optional[Path] = RecipeOption,
            sets: Optional[list[str]] = SetOption, model: Optional[str] = ModelOption,
            force: bool = ForceOption) -> None:
    """Record residual activations with vs without the persona: z-scores, push/pull sets, steering vectors."""
    ctx = build_context(constitution, run, preset, recipe, sets, model)
    run_stages(ctx, PROFILE_STAGES, force=force)
    print_profile(ctx)


# ----------------------------------------------------------------------------- sdft
def metric_trend(log_path: Path, key: str) -> str:
    """'KEY first -> last over N steps' from a training log ('' when no record has KEY)."""
    from character_baker.core.runs import read_jsonl

    values = [record[key] for record in read_jsonl(log_path) if key in record]
    return f"{key} {values[0]:.4g} -> {values[-1]:.4g} over {len(values)} steps" if values else ""


def show_adapter_answers(ctx: Any, adapter: str, count: int) -> None:
    """Answers of base + adapters/<adapter> to `count` held-out prompts, without a system prompt."""
    from character_baker.backends.generation.hf import HFBackend
    from character_baker.backends.models import load_model

    if count <= 0:
        return
    model, tokenizer = load_model(ctx.recipe.models.base, ctx.recipe.models)
    backend = HFBackend(model, tokenizer, batch_size=ctx.recipe.generation.student.batch_size)
    backend.load_adapter(ctx.run.path("adapters", adapter), adapter)
    prompts = held_out_prompts(count)
    outputs = backend.generate([[{"role": "user", "content": p}] for p in prompts],
                               ctx.recipe.generation.student.sampling, adapter=adapter)
    print_answers(f"{adapter} adapter, no system prompt", prompts, [row[0].text for row in outputs])


def sdft(constitution: Path = ConstitutionArg, run: Optional[Path] = RunOption,
         preset: Optional[str] = PresetOption, recipe: Optional[Path] = RecipeOption,
         sets: Optional[list[str]] = SetOption, model: Optional[str] = ModelOption,
         show: int = ShowOption, force: bool = ForceOption) -> None:
    """On-policy self-distillation: the base + persona prompt teaches the adapter with no prompt (adapters/sdft/)."""
    from character_baker.pipeline.chain import command_chain

    ctx = build_context(constitution, run, preset, recipe, sets, model)
    run_command_chain(ctx, command_chain(ctx.recipe, "sdft"), force=force)
    trend = metric_trend(ctx.run.path("logs", "sdft.jsonl"), ctx.recipe.sdft.divergence)
    console.print(f"adapter: {ctx.run.path('adapters', 'sdft')}" + (f"   {trend}" if trend else ""), markup=False)
    show_adapter_answers(ctx, "sdft", show)


# ----------------------------------------------------------------------------- push-pull
def push_pull(constitution: Path = ConstitutionArg, run: Optional[Path] = RunOption,
              preset: Optional[str] = PresetOption, recipe: Optional[Path] = RecipeOption,
              sets: Optional[list[str]] = SetOption, model: Optional[str] = ModelOption,
              show: int = typer.Option(5, "--show", min=0, help="Held-out prompts the trained adapter answers (no "
                                       "system prompt) afterwards; distill and sdft adapters, which sit on the base."),
              force: bool = ForceOption) -> None:
    """Run the training stage named by push_pull.stage with the push/pull activation regulariser switched on."""
    from character_baker.core.errors import UserError
    from character_baker.pipeline.chain import command_chain
    from character_baker.stages.data.introspection import require_distill_adapter

    overrides = list(sets or []) + ["push_pull.enabled=true"]
    ctx = build_context(constitution, run, preset, recipe, overrides, model)
    stage = ctx.recipe.push_pull.stage
    if stage == "introspect":
        require_distill_adapter(ctx)
    run_command_chain(ctx, command_chain(ctx.recipe, stage), force=force)
    trend = metric_trend(ctx.run.path("logs", f"{stage}.jsonl"), "push_pull_loss")
    if not trend:  # a trainer that does not read push_pull_losses() would train without the term: say so
        raise UserError.single("recipe", "push_pull.stage", f"the {stage} stage trained without the push/pull term "
                               "(its trainer does not add it)", "use --set push_pull.stage=sdft")
    console.print(trend, markup=False)
    if stage in ("distill", "sdft"):
        show_adapter_answers(ctx, stage, show)


# ----------------------------------------------------------------------------- steer
def steer(constitution: Path = ConstitutionArg, run: Optional[Path] = RunOption,
          preset: Optional[str] = PresetOption, recipe: Optional[Path] = RecipeOption,
          sets: Optional[list[str]] = SetOption, model: Optional[str] = ModelOption,
          strengths: str = typer.Option("0,2,4,8", "--strengths", help="Comma-separated steering strengths to sweep."),
          prompts: Optional[list[str]] = typer.Option(None, "--prompt", help="A user prompt (repeatable); "
                                                      "default: --count held-out prompts across categories."),
          count: int = typer.Option(3, "--count", min=1, help="Held-out prompts when no --prompt is given."),
          vector: Optional[str] = typer.Option(None, "--vector", help="mean_diff or pca (default: steer.vector)."),
          profile_file: Optional[Path] = typer.Option(None, "--profile", help="A profile.safetensors "
                                                      "(default: this run's, built first if needed)."),
          force: bool = ForceOption) -> None:
    """Steering baseline: answers with the persona vector added to the residual stream, per strength."""
    from character_baker.backends.generation.hf import HFBackend
    from character_baker.backends.models import load_model
    from character_baker.backends.steering import PROFILE_FILE, load_steering, strength_sweep

    values = parse_number_list(strengths, "--strengths", "0,2,4,8")
    ctx = build_context(constitution, run, preset, recipe, sets, model)
    if profile_file is None:
        run_stages(ctx, PROFILE_STAGES, force=force)
    cfg = ctx.recipe.steer
    vectors = load_steering(profile_file or ctx.run.path(PROFILE_FILE), vector or cfg.vector)
    base, tokenizer = load_model(ctx.recipe.models.base, ctx.recipe.models)
    backend = HFBackend(base, tokenizer, batch_size=ctx.recipe.generation.student.batch_size)
    questions = list(prompts or held_out_prompts(count))
    conversations = [[{"role": "user", "content": question}] for question in questions]
    results = strength_sweep(backend, vectors, values, conversations, ctx.recipe.generation.student.sampling,
                             layer_start=cfg.layer_start, layer_end=cfg.layer_end)
    for result in results:
        first, last = result["layers"]
        print_answers(f"strength {result['strength']:g} ({vectors.kind}, layers {first}..{last})", questions,
                      result["answers"])
