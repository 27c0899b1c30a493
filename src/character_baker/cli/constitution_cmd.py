"""`character-baker constitution`: validate, score, show, create and import constitutions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from character_baker.cli.common import JsonOption, console

if TYPE_CHECKING:
    from character_baker.core.constitution import Constitution

app = typer.Typer(help="Validate, score, show, create and import constitutions.", no_args_is_help=True)

FileArg = typer.Argument(..., help="Constitution YAML file.")
ForceOption = typer.Option(False, "--force", help="Overwrite the output file if it exists.")


def _refuse_overwrite(path: Path, force: bool) -> None:
    """UserError when `path` exists and --force was not given."""
    from character_baker.core.errors import UserError

    if path.exists() and not force:
        raise UserError.single(str(path), "--out", "file already exists",
                               "pass --force to overwrite it, or choose another path with --out")


@app.command("validate")
def validate(files: list[Path] = typer.Argument(..., help="One or more constitution YAML files.")) -> None:
    """Check constitutions; report every problem of every file (exit 2 if any is invalid)."""
    from rich.markup import escape

    from character_baker.core.constitution import load_constitution
    from character_baker.core.errors import UserError

    problems = []
    for path in files:
        try:
            constitution = load_constitution(path)
        except UserError as error:
            problems += error.problems
            continue
        console.print(f"[green]ok[/]: {escape(str(path))} ({escape(constitution.persona.name)}, "
                      f"{len(constitution.traits)} traits, {len(constitution.all_questions())} questions)",
                      soft_wrap=True)
    if problems:
        raise UserError(problems)


@app.command("score")
def score(file: Path = FileArg, as_json: bool = JsonOption) -> None:
    """Score a constitution 0..1 with a per-part breakdown and advice on what to add."""
    from character_baker.core.constitution import load_constitution
    from character_baker.core.quality import quality_table, score_constitution

    report = score_constitution(load_constitution(file))
    if as_json:
        import json

        typer.echo(json.dumps({"file": str(file), **report.to_dict()}, indent=2))
        return
    console.print(quality_table(report, title=str(file)))


@app.command("show")
def show(file: Path = FileArg, as_json: bool = JsonOption,
         prompts: bool = typer.Option(False, "--prompts", help="Show every rendered system prompt, "
                                                               "not only the teacher's.")) -> None:
    """Print a readable summary of a constitution and its rendered teacher system prompt."""
    from character_baker.core.constitution import load_constitution
    from character_baker.core.system_prompts import all_prompts, teacher_system_prompt

    constitution = load_constitution(file)
    rendered = all_prompts(constitution) if prompts else {"teacher system prompt": teacher_system_prompt(constitution)}
    if as_json:
        import json

        typer.echo(json.dumps({"file": str(file), "constitution": constitution.model_dump(mode="json"),
                               "question_counts": [len(t.questions) for t in constitution.traits],
                               "prompts": rendered}, indent=2, ensure_ascii=False))
        return
    _print_summary(constitution, file)
    _print_prompts(rendered)


def _print_summary(constitution: "Constitution", file: Path) -> None:
    """Persona, voice, traits with question counts, directives, safety and examples."""
    from rich.markup import escape
    from rich.table import Table

    meta, persona, voice = constitution.meta, constitution.persona, constitution.persona.voice
    console.print(f"[bold]{escape(persona.name)}[/]  ({escape(meta.name)} v{escape(meta.version)}, "
                  f"{escape(str(file))})")
    if meta.description:
        console.print(escape(meta.description))
    console.print(f"\n[bold]identity[/]\n{escape(persona.identity)}")
    console.print(f"\n[bold]voice[/]  tone: {escape(voice.tone or '-')}; formality: {escape(voice.formality or '-')}; "
                  f"vocabulary: {escape(', '.join(voice.vocabulary) or '-')}")
    traits = Table(title="traits")
    for column in ("#", "trait", "questions"):
        traits.add_column(column)
    for index, trait in enumerate(constitution.traits, start=1):
        traits.add_row(str(index), escape(trait.trait), str(len(trait.questions)))
    console.print(traits)
    directives = constitution.directives
    _print_list("directives: personality", directives.personality)
    _print_list("directives: behavior", directives.behavior)
    _print_list("directives: constraints", directives.constraints)
    _print_list("safety: refusals", [f"{r.request} -> {r.response}" for r in constitution.safety.refusals])
    _print_list("safety: boundaries", constitution.safety.boundaries)
    _print_list("examples", [f"user: {e.prompt}\n    {persona.name}: {e.response}" for e in constitution.examples])


def _print_list(title: str, items: list[str]) -> None:
    """A bold title and one bullet per item ('-' when empty)."""
    from rich.markup import escape

    console.print(f"\n[bold]{title}[/]")
    for item in items or ["-"]:
        console.print(f"  - {escape(item)}")


def _print_prompts(rendered: dict[str, str]) -> None:
    """Each rendered system prompt in its own panel, printed literally."""
    from rich.panel import Panel
    from rich.text import Text

    for name, prompt in rendered.items():
        console.print(Panel(Text(prompt), title=name, title_align="left"))


@app.command("new")
def new(name: str = typer.Argument(..., help="Character name, e.g. 'pirate' or 'Captain Morgan'."),
        out: Optional[Path] = typer.Option(None, "--out", help="Where to write it (default: ./<slug>.yaml)."),
        force: bool = ForceOption) -> None:
    """Write a commented starter constitution that validates as written."""
    from character_baker.core.constitution_template import render_template, template_names
    from character_baker.core.runs import atomic_write_text

    slug, _ = template_names(name)
    path = out or Path(f"{slug}.yaml")
    _refuse_overwrite(path, force)
    atomic_write_text(path, render_template(name))
    console.print(f"wrote {path}; edit it, then run `character-baker constitution score {path}`",
                  markup=False, soft_wrap=True)


@app.command("import")
def import_cmd(file: Path = typer.Argument(..., help="Open Character Training file (.txt JSON list or .jsonl)."),
               out: Path = typer.Option(..., "--out", help="Where to write the constitution YAML."),
               name: Optional[str] = typer.Option(None, "--name", help="Persona name (default: from the file name)."),
               force: bool = ForceOption) -> None:
    """Convert an Open Character Training constitution into a character-baker YAML file."""
    from character_baker.core.constitution import dump_constitution_yaml
    from character_baker.core.importers import import_oct
    from character_baker.core.quality import score_constitution
    from character_baker.core.runs import atomic_write_text

    constitution = import_oct(file, name)
    _refuse_overwrite(out, force)
    header = f"# Imported from {file.name} by `character-baker constitution import`.\n"
    atomic_write_text(out, header + dump_constitution_yaml(constitution))
    report = score_constitution(constitution)
    console.print(f"wrote {out}: {constitution.persona.name}, {len(constitution.traits)} traits, "
                  f"score {report.overall:.2f}; run `character-baker constitution score {out}` for what to add",
                  markup=False, soft_wrap=True)
