"""`character-baker train`: constitution(s) in, a trained, merged and evaluated character out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from character_baker.cli.common import JsonOption, ModelOption, PresetOption, RecipeOption, SetOption, console
from character_baker.cli.stage_cmds import ForceOption, build_context

RunsRootOption = typer.Option(Path("runs"), "--runs-root", help="Folder for run directories (runs/<name>).")


def _print_plan(name: str, plan) -> None:
    from rich.table import Table

    table = Table(title=f"plan for {name} ({plan.device}, {plan.params / 1e6:.0f}M parameters)")
    table.add_column("stage")
    table.add_column("action")
    for stage in plan.planned:
        table.add_row(stage, plan.actions.get(stage, "not selected"))
    console.print(table)
    counts = ", ".join(f"{key} {value:,}" for key, value in plan.shown_counts().items())
    console.print(f"counts: {counts}")
    console.print(f"estimated tokens: {plan.tokens_generate:,} to generate, {plan.tokens_train:,} to train on")
    console.print(f"estimated time on this machine: {plan.seconds / 60:.1f} min (rough: rates from benchmarks/)")
    for warning in plan.warnings:
        console.print(f"[yellow]warning[/]: {warning}", soft_wrap=True)


def _print_summary(ctx, outcomes) -> None:
    from rich.table import Table

    table = Table(title=f"train summary: {ctx.run.root}")
    for column in ("stage", "status", "wall s", "tokens generated", "tokens trained"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for outcome in outcomes:
        table.add_row(outcome.name, outcome.status, f"{outcome.seconds:.1f}", f"{outcome.tokens_generated:,}",
                      f"{outcome.tokens_trained:,}")
    console.print(table)
    model = ctx.run.path("model")
    if (model / "config.json").is_file():
        console.print(f"model: {model}", markup=False)
    elif ctx.run.path("adapters", "persona", "adapter_config.json").is_file():
        console.print(f"persona adapter: {ctx.run.path('adapters', 'persona')}", markup=False)
    report = ctx.run.path("eval", "report.html")
    if report.is_file():
        console.print(f"report: {report}", markup=False)
    calibrated = ctx.run.stage("calibrate").get("summary") or {}
    if "chosen_scale" in calibrated:
        note = "" if calibrated["within_tolerance"] else " (no scale met the tolerances: the smallest is kept)"
        console.print(f"persona strength: merge scale {calibrated['chosen_scale']:g}{note}", markup=False)
    for line in headline_numbers(ctx):
        console.print(line, markup=False, soft_wrap=True)


def headline_numbers(ctx) -> list[str]:
    """The evaluation's headline (eval/report.json) and answers side by side, as lines to print."""
    path = ctx.run.path("eval", "report.json")
    if not path.is_file():
        return []
    from character_baker.stages.evaluation.report import headline_lines

    return headline_lines(json.loads(path.read_text(encoding="utf-8")))


def _train_one(path: Path, shared: dict, *, runs_root: Path, preset, recipe, sets, model, start, until, only,
               dry_run: bool, force: bool):
    from character_baker.pipeline.chain import with_push_pull
    from character_baker.pipeline.train import plan_run, run_chain

    constitution_name = path.stem
    ctx = build_context(path, None, preset, recipe, sets, model, runs_root=runs_root)
    ctx.shared = shared
    ctx.recipe = with_push_pull(ctx.recipe)
    plan = plan_run(ctx, start, until, only, force)
    _print_plan(ctx.constitution.meta.name or constitution_name, plan)
    if dry_run:
        return ctx, []
    from character_baker.core.progress import chain_display

    with chain_display(plan.stages, plan.stage_seconds) as display:
        outcomes = run_chain(ctx, plan.stages, plan.planned, force=force, on_start=display.stage_started,
                             on_stage=lambda o: display.stage_finished(o.name, o.seconds, o.status))
    _print_summary(ctx, outcomes)
    return ctx, outcomes


def train(constitutions: list[Path] = typer.Argument(..., help="Constitution files, or folders of them (a batch).",
                                                     show_default=False),
          preset: Optional[str] = PresetOption, recipe: Optional[Path] = RecipeOption,
          sets: Optional[list[str]] = SetOption, model: Optional[str] = ModelOption,
          start: Optional[str] = typer.Option(None, "--from", help="First stage to run (earlier ones must be done)."),
          until: Optional[str] = typer.Option(None, "--until", help="Last stage to run."),
          only: Optional[list[str]] = typer.Option(None, "--only", help="Run only this stage (repeatable)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, counts and estimates; run nothing."),
          runs_root: Path = RunsRootOption, force: bool = ForceOption, as_json: bool = JsonOption) -> None:
    """Run the whole chain (prompts, distill, introspect, merge, eval) for one or more constitutions."""
    from character_baker.pipeline.train import expand_constitution_paths, run_batch

    paths = expand_constitution_paths(constitutions)
    options = dict(runs_root=runs_root, preset=preset, recipe=recipe, sets=sets, model=model, start=start,
                   until=until, only=only, dry_run=dry_run, force=force)
    if len(paths) == 1 and not as_json:
        _train_one(paths[0], {}, **options)
        return
    results = run_batch(paths, lambda path, shared: _train_one(path, shared, **options), log=console.print)
    _report_batch(results, as_json)
    if not all(result.ok for result in results):
        raise typer.Exit(1)


def _report_batch(results, as_json: bool) -> None:
    rows = [{"constitution": r.constitution, "ok": r.ok, "run": r.run, "seconds": round(r.seconds, 1),
             "stages": {o.name: o.status for o in r.outcomes}, "error": r.error} for r in results]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="batch summary")
    for column in ("constitution", "result", "wall s", "run / error"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["constitution"], "ok" if row["ok"] else "FAILED", f"{row['seconds']:.1f}",
                      row["run"] if row["ok"] else row["error"].splitlines()[-1][:120])
    console.print(table)
