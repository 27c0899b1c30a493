"""`character-baker eval RUN`: compare the run's conditions side by side and write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from character_baker.cli.common import PresetOption, RecipeOption, SetOption, console, err_console, resolve_settings

RunArg = typer.Argument(..., help="Run directory (holds manifest.json).", show_default=False)
ConstitutionOption = typer.Option(None, "--constitution", help="Constitution YAML (default: the one the run recorded).")
ModelsOption = typer.Option(None, "--model", help="Extra model to compare, NAME=REF or REF (folder, .gguf, Hub id); "
                                                  "repeatable. The base model comes from the run "
                                                  "(or --set models.base=).")
AdapterOption = typer.Option(None, "--adapter", help="Extra LoRA adapter on the base model, NAME=PATH; repeatable.")
PromptsOption = typer.Option(None, "--prompts", help="Extra held-out user prompts: .txt (one per line) or .jsonl "
                                                     "({\"prompt\": ...}); repeatable.")
LmEvalOption = typer.Option(None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks (needs `lm-eval`).")
WithRunOption = typer.Option(None, "--with-run", help="Another persona's run: its pairs join the classifier (N-way); "
                                                      "repeatable.")
ForceOption = typer.Option(False, "--force", help="Evaluate even when nothing changed since the last report.")


def _open_run(path: Path, flag: str) -> Any:
    from character_baker.core.errors import UserError
    from character_baker.core.runs import RunDir

    try:
        return RunDir.open(path)
    except FileNotFoundError:
        raise UserError.single(str(path), flag, "not a run directory (no manifest.json)",
                               "pass a folder made by `character-baker distill` or `train`, e.g. runs/pirate") from None


def _constitution_path(run: Any, given: Optional[Path]) -> Path:
    from character_baker.core.errors import UserError

    if given is not None:
        return given
    recorded = run.manifest().get("constitution", {}).get("path")
    if not recorded or not Path(recorded).is_file():
        raise UserError.single(str(run.manifest_path), "constitution.path",
                               f"the run's constitution file is not available ({recorded or 'not recorded'})",
                               "pass it with --constitution FILE")
    return Path(recorded)


def _settings(run: Any, constitution_path: Path, preset: Optional[str], recipe: Optional[Path],
              sets: Optional[list[str]]) -> tuple[Any, Any]:
    """The constitution and recipe: the run's recorded recipe with --set on top; with --preset or --recipe, those
    layers over the constitution instead, model settings the user did not set still coming from the run."""
    from character_baker.core.recipes import resolve_recorded_recipe

    recorded = run.manifest().get("recipe", {})
    if preset is None and recipe is None and recorded:
        constitution = resolve_settings(constitution_path, None, None, None)[0]
        resolved = resolve_recorded_recipe(recorded, str(run.manifest_path), sets)
    else:
        constitution, resolved = resolve_settings(constitution_path, preset, recipe, sets)
        for key, value in recorded.get("models", {}).items():
            if resolved.source_of(f"models.{key}") == "default" and hasattr(resolved.recipe.models, key):
                setattr(resolved.recipe.models, key, value)
    recorded_hash = run.manifest().get("constitution", {}).get("hash")
    if recorded_hash and recorded_hash != constitution.content_hash():
        err_console.print(f"warning: {constitution_path} changed since this run was trained", markup=False)
    return constitution, resolved.recipe


def _options(models: Optional[list[str]], adapters: Optional[list[str]], prompts: Optional[list[Path]],
             lm_eval: Optional[str], with_runs: Optional[list[Path]]) -> dict[str, Any]:
    """Validated options for the stage; every bad value is rejected before any model loads."""
    from character_baker.core.errors import UserError
    from character_baker.stages.evaluation.conditions import check_adapter_folder, parse_named_refs
    from character_baker.stages.evaluation.harness import parse_tasks, require_lm_eval
    from character_baker.stages.evaluation.prompt_sets import read_prompt_file

    named_adapters = parse_named_refs(adapters, "--adapter")
    named_models = parse_named_refs(models, "--model")
    for name in set(named_adapters) & set(named_models):
        raise UserError.single("--model", name, f"'{name}' names both an adapter and a model", "rename one of them")
    for path in named_adapters.values():
        check_adapter_folder(path, "--adapter")
    for path in prompts or []:
        read_prompt_file(path)
    tasks = parse_tasks(lm_eval)
    if tasks:
        require_lm_eval()
    for path in with_runs or []:
        _open_run(path, "--with-run")
    return {"adapters": {k: str(Path(v).expanduser().resolve()) for k, v in named_adapters.items()},
            "models": named_models, "prompt_files": [str(p) for p in prompts or []], "lm_eval": tasks,
            "with_runs": [str(p) for p in with_runs or []]}


def eval_run(run: Path = RunArg, constitution: Optional[Path] = ConstitutionOption,
             preset: Optional[str] = PresetOption, recipe: Optional[Path] = RecipeOption,
             sets: Optional[list[str]] = SetOption, models: Optional[list[str]] = ModelsOption,
             adapters: Optional[list[str]] = AdapterOption, prompts: Optional[list[Path]] = PromptsOption,
             lm_eval: Optional[str] = LmEvalOption, with_runs: Optional[list[Path]] = WithRunOption,
             force: bool = ForceOption) -> None:
    """Compare base, prompted, steered, distilled, trained and extra conditions; write eval/report.json and .html."""
    import json

    from character_baker.core.stage import StageContext
    from character_baker.pipeline.runner import run_stage
    from character_baker.pipeline.stages import STAGES
    from character_baker.stages.evaluation.report import REPORT_HTML, REPORT_JSON, terminal_table
    from character_baker.stages.evaluation.stage import inputs_fingerprint

    run_dir = _open_run(run, "RUN")
    constitution_path = _constitution_path(run_dir, constitution)
    loaded, resolved = _settings(run_dir, constitution_path, preset, recipe, sets)
    options = _options(models, adapters, prompts, lm_eval, with_runs)
    options["fingerprint"] = inputs_fingerprint(run_dir, options)
    ctx = StageContext(run=run_dir, constitution=loaded, recipe=resolved, constitution_path=constitution_path,
                       options=options, console=console)
    run_stage(STAGES["eval"], ctx, force=force)
    report = json.loads(run_dir.path(REPORT_JSON).read_text(encoding="utf-8"))
    console.print(terminal_table(report))
    console.print(f"report: {run_dir.path(REPORT_JSON)}\nhtml:   {run_dir.path(REPORT_HTML)}", markup=False)
