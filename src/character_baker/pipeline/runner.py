"""Run one stage with skip/resume bookkeeping in the manifest."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from character_baker import __version__
from character_baker.core.runs import file_hash, stable_hash
from character_baker.core.stage import Stage, StageContext, StageResult


def library_versions() -> dict[str, str]:
    """Versions recorded in the manifest for reproducibility."""
    from importlib import metadata

    versions = {"character-baker": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def stage_inputs_hash(stage: Stage, ctx: StageContext) -> str:
    """Hash of everything a stage reads: constitution, its recipe slices, upstream artifacts, options."""
    recipe = ctx.recipe.model_dump(mode="json")
    upstream = {name: ctx.run.stage(name).get("artifacts", {}) for name in stage.upstream}
    options = {key: ctx.options.get(key) for key in stage.option_keys}
    return stable_hash({"constitution": ctx.constitution.content_hash(),
                        "recipe": {section: recipe.get(section) for section in stage.recipe_sections},
                        "upstream": upstream, "options": options, "version": __version__})


def record_run_metadata(ctx: StageContext) -> None:
    """Write the resolved recipe, constitution hash and versions into the manifest."""
    ctx.run.update_manifest(
        constitution={"name": ctx.constitution.meta.name, "path": str(ctx.constitution_path or ""),
                      "hash": ctx.constitution.content_hash()},
        recipe=ctx.recipe.model_dump(mode="json"), versions=library_versions())


def is_main_process() -> bool:
    """False in the non-zero ranks of a multi-process launch (only rank 0 writes the manifest)."""
    return os.environ.get("RANK", "0") == "0"


def missing_artifacts(ctx: StageContext, name: str) -> list[str]:
    """The run-relative outputs the manifest records for stage `name` that no longer exist on disk."""
    return [rel for rel in ctx.run.stage(name).get("artifacts", {}) if not ctx.run.path(rel).exists()]


def run_stage(stage: Stage, ctx: StageContext, *, force: bool = False) -> tuple[StageResult | None, dict[str, Any]]:
    """Run `stage` unless its inputs are unchanged; record status, hashes, timings; return (result, entry)."""
    inputs_hash = stage_inputs_hash(stage, ctx)
    if not force and ctx.run.is_stage_current(stage.name, inputs_hash):
        missing = missing_artifacts(ctx, stage.name)
        if not missing:
            ctx.log(f"[{stage.name}] inputs unchanged since the last run: skipped")
            return None, ctx.run.stage(stage.name)
        ctx.log(f"[{stage.name}] inputs unchanged, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} gone: running it again")
    if not is_main_process():  # every rank trains; rank 0 alone keeps the manifest
        return stage.run(ctx), {}
    record_run_metadata(ctx)
    ctx.run.set_stage(stage.name, status="running", inputs_hash=inputs_hash, started=time.time())
    started = time.perf_counter()
    try:
        result = stage.run(ctx)
    except BaseException as error:
        ctx.run.set_stage(stage.name, status="failed", error=f"{type(error).__name__}: {error}"[:500])
        raise
    seconds = time.perf_counter() - started
    artifacts = {rel: file_hash(ctx.run.path(rel)) for rel in result.artifacts if ctx.run.path(rel).exists()}
    ctx.run.set_stage(stage.name, status="done", inputs_hash=inputs_hash, seconds=round(seconds, 3),
                      artifacts=artifacts, summary=result.summary, tokens_generated=result.tokens_generated,
                      tokens_trained=result.tokens_trained, finished=time.time())
    return result, ctx.run.stage(stage.name)


def default_run_dir(constitution_name: str, runs_root: Path = Path("runs")) -> Path:
    """runs/<constitution name>."""
    return runs_root / constitution_name
