"""`character-baker constitution` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="constitution commands.", no_args_is_help=True)
