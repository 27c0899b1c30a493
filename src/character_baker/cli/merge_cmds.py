"""`introspect`, `merge` and `export`: from the distilled model to a persona you can ship.

    character-baker introspect constitutions/pirate.yaml          # data + SFT -> adapters/introspect/
    character-baker merge runs/pirate --scales 0.25,0.5,1.0       # -> adapters/persona/, model/, sweep table
    character-baker export runs/pirate --out exports/pirate       # -> a standard Hugging Face folder
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from character_baker.cli.common import ModelOption, PresetOption, RecipeOption, SetOption, console, err_console, parse_number_list
from character_baker.cli.stage_cmds import (ConstitutionArg, ForceOption, RunOption, build_context, run_command_chain,
                                            run_stages)

RunArg = typer.Argument(..., help="Run directory (holds manifest.json).", show_default=False)
ConstitutionOption = typer.Option(None, "--constitution", help="Constitution YAML (default: the one the run recorded).")


# ----------------------------------------------------------------------------- introspect
def introspect(constitution: Path = ConstitutionArg, run: Optional[Path] = RunOption,
               preset: Optional[str] = PresetOption, recipe: Optional[Path] = RecipeOption,
               sets: Optional[list[str]] = SetOption, model: Optional[str] = ModelOption,
               data_only: bool = typer.Option(False, "--data-only",
                                              help="Build data/introspection.jsonl and stop before training."),
               force: bool = ForceOption) -> None:
    """Self-reflections and self-interactions by the distilled model, then LoRA SFT on it (needs adapters/distill)."""
    from character_baker.pipeline.chain import command_chain
    from character_baker.stages.data.introspection import require_distill_adapter

    ctx = build_context(constitution, run, preset, recipe, sets, model)
    require_distill_adapter(ctx)
    run_command_chain(ctx, command_chain(ctx.recipe, "introspect", data_only=data_only), force=force)
    console.print(f"data: {ctx.run.path('data/introspection.jsonl')}", markup=False)
    if not data_only:
        console.print(f"adapter: {ctx.run.path('adapters/introspect')}", markup=False)


# ----------------------------------------------------------------------------- a context from a run
def open_run(path: Path) -> Any:
    """The run directory at `path`; a UserError when it has no manifest."""
    from character_baker.core.errors import UserError
    from character_baker.core.runs import RunDir

    try:
        return RunDir.open(path)
    except FileNotFoundError:
        raise UserError.single(str(path), "RUN", "not a run directory (no manifest.json)",
                               "pass a folder made by `character-baker distill`, e.g. runs/pirate") from None


def run_context(run: Path, constitution: Optional[Path], sets: list[str]) -> Any:
    """A StageContext for an existing run: its recorded recipe (with --set on top) and constitution."""
    from character_baker.core.constitution import load_constitution
    from character_baker.core.errors import UserError
    from character_baker.core.recipes import resolve_recorded_recipe
    from character_baker.core.stage import StageContext

    run_dir = open_run(run)
    manifest = run_dir.manifest()
    recorded = manifest.get("recipe")
    if not recorded:
        raise UserError.single(str(run_dir.manifest_path), "recipe", "this run has recorded no recipe (no stage ran)",
                               "run `character-baker distill CONSTITUTION --run RUN` first")
    path = constitution or Path(manifest.get("constitution", {}).get("path") or "")
    if not path.is_file():
        raise UserError.single(str(run_dir.manifest_path), "constitution.path",
                               f"the run's constitution file is not available ({path})", "pass it with --constitution FILE")
    loaded = load_constitution(path)
    if loaded.content_hash() != manifest.get("constitution", {}).get("hash"):
        err_console.print(f"warning: {path} is not the constitution this run recorded", markup=False)
    resolved = resolve_recorded_recipe(recorded, str(run_dir.manifest_path), sets)
    return StageContext(run=run_dir, constitution=loaded, recipe=resolved.recipe, constitution_path=path,
                        console=console)


# ----------------------------------------------------------------------------- merge
def parse_weights(text: str) -> dict[str, float]:
    """'distill=1.0,introspect=0.25' -> {'distill': 1.0, 'introspect': 0.25}; UserError on a bad entry."""
    from character_baker.core.errors import UserError

    weights = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = entry.partition("=")
        try:
            weight = float(value) if sep and name.strip() else None
        except ValueError:
            weight = None
        if weight is None:
            raise UserError.single("--weights", entry, "expected NAME=WEIGHT",
                                   "write e.g. --weights distill=1.0,introspect=0.25")
        weights[name.strip()] = weight
    return weights


def print_sweep_table(table: dict) -> None:
    """The sweep as a terminal table: one row per scale, one column per metric."""
    from rich.table import Table

    view = Table(title=f"merge scale sweep ({table['prompts']} neutral prompts, mode {table['mode']})")
    for column in table["columns"]:
        view.add_column(column, justify="right")
    for row in table["rows"]:
        view.add_row(*(f"{row[column]:.4g}" for column in table["columns"]))
    console.print(view)


def merge(run: Path = RunArg, constitution: Optional[Path] = ConstitutionOption, sets: Optional[list[str]] = SetOption,
          weights: Optional[str] = typer.Option(None, "--weights", help="Adapters and weights, replacing merge.weights, "
                                                "e.g. distill=1.0,introspect=0.25 (published)."),
          mode: Optional[str] = typer.Option(None, "--mode", help="fold (exact, full weights), svd (one LoRA of --rank), "
                                             "linear (PEFT parity, cross terms)."),
          rank: Optional[int] = typer.Option(None, "--rank", help="Rank of the SVD re-factorisation (merge.svd_rank)."),
          scales: Optional[str] = typer.Option(None, "--scales",
                                               help="Sweep these merge scales, e.g. 0.25,0.5,0.75,1.0,1.25."),
          sweep_prompts: int = typer.Option(16, "--sweep-prompts", min=1, help="Neutral prompts per scale."),
          sweep_tokens: int = typer.Option(64, "--sweep-tokens", min=1, help="Answer tokens per prompt in the sweep."),
          force: bool = ForceOption) -> None:
    """Combine the run's adapters into adapters/persona/ (and model/ when folding); optionally sweep the scale."""
    import json

    from character_baker.core.runs import adapter_hash
    from character_baker.stages.merging.sweep import SWEEP_FILE

    overrides = list(sets or []) + ([f"merge.mode={mode}"] if mode else []) + ([f"merge.svd_rank={rank}"] if rank else [])
    ctx = run_context(run, constitution, overrides)
    if weights is not None:
        ctx.recipe.merge.weights = parse_weights(weights)
    names = list(ctx.recipe.merge.weights)
    ctx.options["adapters"] = {name: adapter_hash(ctx.run.path("adapters", name)) for name in names}
    stages = ["merge"]
    if scales:
        ctx.options.update(scales=parse_number_list(scales, "--scales", "0.25,0.5,0.75,1.0,1.25"), sweep_prompts=sweep_prompts, sweep_tokens=sweep_tokens)
        stages.append("merge_sweep")
    run_stages(ctx, stages, force=force)
    console.print(f"persona adapter: {ctx.run.path('adapters/persona')}", markup=False)
    if ctx.recipe.merge.mode == "fold":
        console.print(f"full weights: {ctx.run.path('model')}", markup=False)
    if scales:
        print_sweep_table(json.loads(ctx.run.path(SWEEP_FILE).read_text(encoding="utf-8")))


# ----------------------------------------------------------------------------- calibrate
def print_calibration(table: dict) -> None:
    """The calibration sweep as a terminal table, the chosen scale marked, and the rule."""
    from rich.table import Table

    choice = table["choice"]
    view = Table(title=f"calibration ({table['prompts']} held-out prompts, {table['mc_items']} MC items)")
    for column in table["columns"] + ["within tolerance"]:
        view.add_column(column, justify="right")
    for row in table["rows"]:
        cells = ["-" if row.get(c) is None else f"{row[c]:.3g}" for c in table["columns"]]
        mark = "base" if row["scale"] == 0 else ("yes" if row.get("within_tolerance") else "no")
        view.add_row(*cells, mark + ("  <- chosen" if row["scale"] == choice["scale"] else ""))
    console.print(view)
    status = "" if choice["within_tolerance"] else " (no scale met the tolerances: the smallest is kept)"
    console.print(f"chosen scale {choice['scale']:g}{status}; rule: {choice['rule']}", markup=False)


def calibrate(run: Path = RunArg, constitution: Optional[Path] = ConstitutionOption,
              sets: Optional[list[str]] = SetOption,
              scales: Optional[str] = typer.Option(None, "--scales", help="Merge scales to try (calibrate.scales), "
                                                   "e.g. 0.25,0.5,0.75,1.0."),
              force: bool = ForceOption) -> None:
    """Sweep the persona strength on held-out prompts and keep the strongest within tolerance (model/ rewritten)."""
    import json

    from character_baker.core.runs import adapter_hash
    from character_baker.stages.merging.calibrate import CALIBRATION_FILE

    ctx = run_context(run, constitution, list(sets or []))
    if scales:
        ctx.recipe.calibrate.scales = parse_number_list(scales, "--scales", "0.25,0.5,0.75,1.0")
    ctx.options["adapters"] = {name: adapter_hash(ctx.run.path("adapters", name)) for name in ctx.recipe.merge.weights}
    run_stages(ctx, ["calibrate"], force=force)
    print_calibration(json.loads(ctx.run.path(CALIBRATION_FILE).read_text(encoding="utf-8")))
    console.print(f"persona adapter: {ctx.run.path('adapters/persona')}", markup=False)


# ----------------------------------------------------------------------------- export
def export(run: Path = RunArg, out: Optional[Path] = typer.Option(None, "--out", help="Destination folder "
                                                                  "(default: RUN/export)."),
           dtype: str = typer.Option("source", "--dtype", help="Weights dtype: source (the base model's), float32, "
                                     "bfloat16, float16."),
           max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 5GB."),
           constitution: Optional[Path] = ConstitutionOption, sets: Optional[list[str]] = SetOption,
           force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder.")) -> None:
    """Write the merged persona as a standard Hugging Face folder (model card, tokenizer, PEFT adapters)."""
    from character_baker.stages.merging.export import export_run

    ctx = run_context(run, constitution, list(sets or []))
    result = export_run(ctx, out or ctx.run.path("export"), dtype=dtype, max_shard_size=max_shard_size, overwrite=force)
    console.print(f"exported {result['out']}: {result['shards']} safetensors shard(s) in {result['dtype']}, "
                  f"adapters: {', '.join(result['adapters']) or 'none'}", markup=False)
