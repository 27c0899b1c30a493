"""Stage commands: each runs one stage (and what it needs) on a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from character_baker.cli.common import (ModelOption, PresetOption, RecipeOption, SetOption, console,
                                        resolve_settings)

RunOption = typer.Option(None, "--run", "--run-dir", help="Run directory (default: runs/<constitution name>).")
ForceOption = typer.Option(False, "--force", help="Run stages even when their inputs are unchanged.")
ConstitutionArg = typer.Argument(..., help="Constitution YAML file.", show_default=False)


def build_context(constitution_path: Path, run: Optional[Path], preset: Optional[str], recipe: Optional[Path],
                  sets: Optional[list[str]], model: Optional[str], runs_root: Path = Path("runs"), **options: Any):
    """Resolve settings and open (or create) the run directory; return a StageContext."""
    from character_baker.core.runs import RunDir
    from character_baker.core.stage import StageContext
    from character_baker.pipeline.runner import default_run_dir

    from character_baker.stages.data.sources import check_user_dataset_files

    constitution, resolved = resolve_settings(constitution_path, preset, recipe, sets, model)
    check_user_dataset_files(resolved.recipe.prompts.user_datasets, constitution_path)  # before anything is written
    run_dir = RunDir.create(run or default_run_dir(constitution.meta.name, runs_root))
    return StageContext(run=run_dir, constitution=constitution, recipe=resolved.recipe,
                        constitution_path=constitution_path, options=options, console=console)


def run_stages(ctx, names: list[str], force: bool = False) -> list[dict]:
    """Run the named stages in order; print each one's summary; return their manifest entries."""
    from character_baker.pipeline.runner import run_stage
    from character_baker.pipeline.stages import STAGES

    entries = []
    for name in names:
        _, entry = run_stage(STAGES[name], ctx, force=force)
        print_stage_summary(name, entry)
        entries.append(entry)
    return entries


def run_command_chain(ctx, names: list[str], force: bool = False) -> None:
    """Run a subcommand's stages as `train` runs them (adapter fingerprints set first), printing each summary."""
    from character_baker.pipeline.train import run_chain

    run_chain(ctx, names, names, force=force,
              on_stage=lambda outcome: print_stage_summary(outcome.name, ctx.run.stage(outcome.name)))


def print_stage_summary(name: str, entry: dict) -> None:
    """A table of one stage's summary: counts per source/category, filter counts, time."""
    from rich.table import Table

    summary = entry.get("summary", {})
    table = Table(title=f"{name}: {entry.get('status', '?')} in {entry.get('seconds', 0):.1f}s", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                table.add_row(f"{key}: {sub_key}", str(sub_value))
        else:
            table.add_row(key, str(value))
    if entry.get("tokens_generated"):
        table.add_row("tokens generated", str(entry["tokens_generated"]))
    console.print(table)


LauncherOption = typer.Option(None, "--launcher", help="Train in several processes: 'torchrun' or 'accelerate' "
                                                        "(DDP; FSDP through an accelerate config).")
NprocOption = typer.Option(1, "--nproc", help="Processes for --launcher (e.g. one per GPU).")


def train_stage_with_launcher(ctx, stage: str, argv: list[str], launcher: Optional[str], nproc: int,
                              force: bool) -> None:
    """Run a training stage here, or re-run this command under a launcher for that stage only."""
    from character_baker.stages.training.launch import relaunch

    code = relaunch([*argv, "--skip-data"], launcher=launcher, nproc=nproc)
    if code is None:
        run_command_chain(ctx, [stage], force=force)
    elif code != 0:
        raise typer.Exit(code)
    else:
        print_stage_summary(stage, ctx.run.stage(stage))


def distill(ctx_typer: typer.Context, constitution: Path = ConstitutionArg, run: Optional[Path] = RunOption,
            preset: Optional[str] = PresetOption, recipe: Optional[Path] = RecipeOption,
            sets: Optional[list[str]] = SetOption, model: Optional[str] = ModelOption,
            data_only: bool = typer.Option(False, "--data-only", help="Build data/distill.jsonl and stop before training."),
            skip_data: bool = typer.Option(False, "--skip-data", help="Train on the existing data/distill.jsonl."),
            launcher: Optional[str] = LauncherOption, nproc: int = NprocOption,
            force: bool = ForceOption) -> None:
    """Build chosen/rejected pairs (teacher with the constitution vs the student) and train a LoRA with DPO."""
    from character_baker.core.errors import UserError

    if data_only and skip_data:
        raise UserError.single("<command line>", "--data-only/--skip-data", "the two flags exclude each other",
                               "use --data-only to build pairs, --skip-data to train on existing pairs")
    from character_baker.pipeline.chain import command_chain

    ctx = build_context(constitution, run, preset, recipe, sets, model)
    chain = command_chain(ctx.recipe, "distill", data_only=data_only, skip_data=skip_data)
    run_command_chain(ctx, chain[:-1] if not data_only else chain, force=force)
    if data_only:
        console.print(f"pairs: {ctx.run.path('data/distill.jsonl')}", markup=False)
        return
    argv = [arg for arg in _command_argv(ctx_typer) if arg not in ("--skip-data",)]
    train_stage_with_launcher(ctx, "distill", argv, launcher, nproc, force)
    console.print(f"adapter: {ctx.run.path('adapters/distill')}", markup=False)


def _command_argv(ctx_typer: typer.Context) -> list[str]:
    """This command's own argv (command name first), without the launcher options."""
    import sys

    given = getattr(ctx_typer, "obj", None)
    args = list(sys.argv[1:]) if given is None else list(given)
    cleaned, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--launcher", "--nproc"):
            skip = True
            continue
        if arg.startswith(("--launcher=", "--nproc=")):
            continue
        # torchrun's parser rejects `--run` as an ambiguous prefix of its own --run-path.
        cleaned.append("--run-dir" + arg[len("--run"):] if arg == "--run" or arg.startswith("--run=") else arg)
    return cleaned
