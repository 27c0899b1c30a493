"""What every command shares: the console, error handling, the recipe options."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from character_baker.core.errors import UserError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# Shared option declarations so every command spells them the same way.
PresetOption = typer.Option(None, "--preset", help="Size preset: smoke (CI, tiny sizes), demo (the README run on a CPU), small (100M-1B models), paper (published sizes), or default.")
RecipeOption = typer.Option(None, "--recipe", help="Recipe YAML file layered over the constitution's recipe.")
SetOption = typer.Option(None, "--set", help="Override one recipe value, e.g. --set distill.lora.r=32 (repeatable).")
ModelOption = typer.Option(None, "--model", help="Base model (shortcut for --set models.base=...).")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


LIBRARY_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_libraries() -> None:
    """Keep third-party progress bars and deprecation warnings out of our output (CHARACTER_BAKER_DEBUG keeps them).

    transformers 5 draws "Loading weights" and "Writing model shards" bars and the GGUF loader its
    own; library FutureWarnings and DeprecationWarnings are about their APIs, not the user's run.
    Environment variables set by the user win (setdefault)."""
    import warnings

    if os.environ.get("CHARACTER_BAKER_DEBUG"):
        return
    for name, value in LIBRARY_QUIET.items():
        os.environ.setdefault(name, value)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|peft|accelerate|huggingface_hub)\b")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(past_key_values|is_gradient_checkpointing|"
                            r"gradient_checkpointing_enable)")


def print_user_error(error: UserError) -> None:
    """Print every problem of a UserError, one per line, to stderr."""
    count = len(error.problems)
    err_console.print(f"[bold red]error[/]: {count} problem{'s' if count != 1 else ''} found", markup=True)
    for problem in error.problems:
        err_console.print(f"  {problem.render()}", markup=False, soft_wrap=True)


def handle_errors(call: Callable[[], Any]) -> int:
    """Run a Click/Typer call; map UserError to exit 2 and unexpected errors to exit 1, no locals."""
    try:
        result = call()
        return int(result or 0)
    except UserError as error:
        print_user_error(error)
        return 2
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except typer.exceptions.TyperException as error:  # click's usage errors (Typer vendors click)
        show = getattr(error, "show", None)
        if show is not None:
            show()
        else:
            err_console.print(f"error: {error}")
        return int(getattr(error, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as error:  # noqa: BLE001 - last line of defence: no traceback with locals
        if os.environ.get("CHARACTER_BAKER_DEBUG"):
            raise
        err_console.print(f"[bold red]internal error[/]: {type(error).__name__}: {error}")
        err_console.print("set CHARACTER_BAKER_DEBUG=1 for the traceback, and please report it "
                          "with the output of `character-baker env`.")
        return 1


def resolve_settings(constitution_path: Optional[Path], preset: Optional[str], recipe: Optional[Path],
                     sets: Optional[list[str]], model: Optional[str] = None):
    """Load the constitution (if any) and resolve the recipe layers; return (constitution, resolved)."""
    from character_baker.core.constitution import load_constitution_file
    from character_baker.core.recipes import Layer, load_recipe_file, parse_set_overrides, resolve_recipe

    layers: list[Layer] = []
    constitution = None
    if constitution_path is not None:
        constitution, lines = load_constitution_file(constitution_path)
        if constitution.recipe:
            layers.append(Layer(name=f"constitution {constitution_path}", values=constitution.recipe,
                                file=str(constitution_path), lines=lines, prefix=("recipe",)))
    if recipe is not None:
        layers.append(load_recipe_file(recipe))
    overrides = list(sets or [])
    if model:
        overrides.append(f"models.base={model}")
    if overrides:
        layers.append(parse_set_overrides(overrides))
    return constitution, resolve_recipe(layers, preset)


def parse_number_list(text: str, option: str, example: str) -> list[float]:
    """'0.25,0.5,1' -> [0.25, 0.5, 1.0]; a UserError naming `option` for anything else or nothing."""
    try:
        numbers = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        numbers = []
    if not numbers:
        raise UserError.single(option, option.lstrip("-"), f"not a comma-separated list of numbers: {text!r}",
                               f"write e.g. {option} {example}")
    return numbers


def is_terminal() -> bool:
    """True when stdout is an interactive terminal (progress bars), False for logs and pipes."""
    return sys.stdout.isatty()
