"""`character-baker recipe`: show and validate the resolved training recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from character_baker.cli.common import (JsonOption, ModelOption, PresetOption, RecipeOption, SetOption, console,
                                        resolve_settings)

app = typer.Typer(help="Show and validate recipes (training configuration).", no_args_is_help=True)

ConstitutionArg = typer.Argument(None, help="Constitution whose `recipe:` section is layered in (optional).")


def _rows(value, prefix=""):
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _rows(sub, f"{prefix}{key}.")
    else:
        yield prefix[:-1], value


@app.command("show")
def show(constitution: Optional[Path] = ConstitutionArg, preset: Optional[str] = PresetOption,
         recipe: Optional[Path] = RecipeOption, sets: Optional[list[str]] = SetOption,
         model: Optional[str] = ModelOption, as_json: bool = JsonOption,
         changed: bool = typer.Option(False, "--changed", help="Only values that differ from the defaults' source.")) -> None:
    """Print the resolved recipe, each value with the layer it came from."""
    _, resolved = resolve_settings(constitution, preset, recipe, sets, model)
    data = resolved.recipe.model_dump(mode="json")
    rows = [(key, value, resolved.source_of(key)) for key, value in _rows(data)]
    if changed:
        rows = [row for row in rows if row[2] != "default"]
    if as_json:
        import json

        typer.echo(json.dumps({"recipe": data, "sources": {k: s for k, _, s in rows}}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"resolved recipe (preset: {resolved.recipe.preset})")
    table.add_column("key")
    table.add_column("value")
    table.add_column("source")
    for key, value, source in rows:
        table.add_row(key, repr(value) if isinstance(value, str) else str(value),
                      source if source != "default" else "[dim]default[/]")
    console.print(table)


@app.command("validate")
def validate(recipe_file: Path = typer.Argument(..., help="Recipe YAML file to check."),
             constitution: Optional[Path] = typer.Option(None, "--constitution", help="Layer this constitution's recipe under it."),
             preset: Optional[str] = PresetOption) -> None:
    """Check a recipe file: unknown keys, bad values, bad combinations (exit 2 with every problem)."""
    _, resolved = resolve_settings(constitution, preset, recipe_file, None)
    console.print(f"[green]ok[/]: {recipe_file} is a valid recipe (preset {resolved.recipe.preset})")
