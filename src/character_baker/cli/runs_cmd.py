"""`character-baker runs`: list run directories and show one."""

from __future__ import annotations

from pathlib import Path

import typer

from character_baker.cli.common import JsonOption, console

app = typer.Typer(help="List run directories and show their stages.", no_args_is_help=True)

RootOption = typer.Option(Path("runs"), "--root", help="Folder holding run directories.")


def _open_run(ref: Path, root: Path):
    from character_baker.core.errors import UserError
    from character_baker.core.runs import RunDir

    for candidate in (ref, root / ref):
        try:
            return RunDir.open(candidate)
        except FileNotFoundError:
            continue
    raise UserError.single(str(ref), "RUN", "no run directory here (no manifest.json)",
                           f"pass a folder under {root}/ listed by `character-baker runs list`")


@app.command("list")
def list_cmd(root: Path = RootOption, as_json: bool = JsonOption) -> None:
    """List run directories under --root, newest first, with each stage's status."""
    from character_baker.core.runs import list_runs

    runs = list_runs(root)
    rows = []
    for run in runs:
        manifest = run.manifest()
        stages = manifest.get("stages", {})
        rows.append({"name": run.name, "path": str(run.root), "constitution": manifest.get("constitution", {}).get("name", ""),
                     "stages": {name: entry.get("status", "?") for name, entry in stages.items()}})
    if as_json:
        import json

        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no runs under {root}/")
        return
    from rich.table import Table

    table = Table(title=f"runs under {root}/")
    for column in ("run", "constitution", "stages"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["constitution"], ", ".join(f"{k}:{v}" for k, v in row["stages"].items()) or "-")
    console.print(table)


@app.command("show")
def show_cmd(run: Path = typer.Argument(..., help="Run directory (or its name under --root)."),
             root: Path = RootOption, as_json: bool = JsonOption) -> None:
    """Show one run: stage status, timings, input hashes and artifact paths."""
    run_dir = _open_run(run, root)
    manifest = run_dir.manifest()
    if as_json:
        import json

        typer.echo(json.dumps(manifest, indent=2))
        return
    from rich.table import Table

    console.print(f"[bold]{run_dir.name}[/]  {run_dir.root}")
    constitution = manifest.get("constitution", {})
    if constitution:
        console.print(f"constitution: {constitution.get('path', '?')} (hash {constitution.get('hash', '?')})")
    table = Table(title="stages")
    for column in ("stage", "status", "seconds", "inputs hash", "artifacts"):
        table.add_column(column)
    for name, entry in manifest.get("stages", {}).items():
        seconds = entry.get("seconds")
        table.add_row(name, str(entry.get("status", "?")), f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "-",
                      str(entry.get("inputs_hash", "-")), "\n".join(entry.get("artifacts", {})) or "-")
    console.print(table)
