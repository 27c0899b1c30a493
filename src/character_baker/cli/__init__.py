"""The `character-baker` command line. Heavy imports live inside commands so --help is instant."""

from __future__ import annotations

import sys

import typer

from character_baker import __version__
from character_baker.cli.common import handle_errors, quiet_libraries
from character_baker.cli import constitution_cmd, env_cmd, eval_cmd, models_cmd, recipe_cmd, runs_cmd, stage_cmds
from character_baker.cli import merge_cmds, method_cmds, serve_cmd, train_cmd

app = typer.Typer(
    name="character-baker",
    help="Bake a character into an open-weight chat model's weights from one YAML constitution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"character-baker {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Bake a character into an open-weight chat model's weights from one YAML constitution."""


app.add_typer(constitution_cmd.app, name="constitution")
app.add_typer(recipe_cmd.app, name="recipe")
app.add_typer(models_cmd.app, name="models")
app.add_typer(runs_cmd.app, name="runs")
app.command("env")(env_cmd.env)
app.command("train")(train_cmd.train)
app.command("distill")(stage_cmds.distill)
app.command("introspect")(merge_cmds.introspect)
app.command("merge")(merge_cmds.merge)
app.command("calibrate")(merge_cmds.calibrate)
app.command("export")(merge_cmds.export)
app.command("eval")(eval_cmd.eval_run)
app.command("serve")(serve_cmd.serve)
app.command("profile")(method_cmds.profile)
app.command("push-pull")(method_cmds.push_pull)
app.command("sdft")(method_cmds.sdft)
app.command("steer")(method_cmds.steer)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv`; return the exit code (0 ok, 1 failure, 2 user mistake)."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    # Commands that relaunch themselves (--launcher) read their own argv from ctx.obj.
    return handle_errors(lambda: app(args=args, prog_name="character-baker", standalone_mode=False, obj=args))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv[1:]))
