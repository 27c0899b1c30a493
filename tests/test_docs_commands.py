"""Every command the docs show exists: README.md and docs/*.md checked against the CLI itself.

For each `character-baker ...` command line in a fenced or indented code block or in inline code,
the subcommand path must exist and every `--flag` must be listed as an option in that
subcommand's `--help` (run in-process). Every `--set KEY=...` anywhere in code must name a real
recipe key, and every `--preset NAME` a real preset. A code block that shows a wrong command on
purpose is preceded by `<!-- docs-check: expect-error -->`, and the check must then find a
problem in it.

docs/recipes.md's field reference is generated from `core/config.py` by `recipe_reference()`;
`python -m tests.test_docs_commands` rewrites it in place.
"""

from __future__ import annotations

import re
import shlex
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAM = "character-baker"
EXPECT_ERROR = "<!-- docs-check: expect-error -->"
SEPARATORS = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&"}
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
# A placeholder is not a value to check: KEY, NAME, generation.<role>.model, key, ...
PLACEHOLDER = re.compile(r"^(key|[A-Z][A-Z0-9_.]*|.*<[^>]*>.*|.*\.\.\..*)$")

RunCli = Callable[..., tuple]


# ----------------------------------------------------------------------------- reading the docs
@dataclass
class Snippet:
    """One piece of code in a doc: a code-block line (continuations joined) or an inline span."""

    file: str
    line: int
    text: str
    block: int | None = None  # code blocks are numbered per file; inline code has none
    expect_error: bool = False


def code_snippets(path: Path) -> list[Snippet]:
    """Fenced and indented code-block lines and inline code spans of a Markdown file."""
    snippets, prose, block_lines = [], [], []
    kind, blocks, expect, previous_blank = None, 0, False, True  # kind: None, "fenced" or "indented"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = FENCE.match(line) is not None
        indented = kind != "fenced" and line.startswith("    ") and bool(line.strip()) \
            and (previous_blank or kind == "indented")
        if block_lines and (kind == "fenced" and fence or kind == "indented" and not indented):
            snippets += _joined(path, block_lines, blocks, expect)
            block_lines, expect = [], False
        if kind == "fenced":
            kind = None if fence else kind
            if not fence:
                block_lines.append((number, line))
        elif fence or indented:
            blocks += 0 if kind == "indented" else 1
            kind = "fenced" if fence else "indented"
            block_lines += [] if fence else [(number, line)]
        else:
            kind = None
            prose.append((number, line))
            expect = expect or line.strip() == EXPECT_ERROR
        previous_blank = not line.strip()
    snippets += _joined(path, block_lines, blocks, expect)
    return snippets + _inline(path, prose)


def _joined(path: Path, lines: list[tuple[int, str]], block: int, expect: bool) -> list[Snippet]:
    """Code lines with backslash continuations joined."""
    out: list[Snippet] = []
    start, parts = None, []
    for number, line in lines:
        start = number if start is None else start
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        out.append(Snippet(str(path.name), start, " ".join(p.strip() for p in parts), block, expect))
        start, parts = None, []
    if parts:
        out.append(Snippet(str(path.name), start or 0, " ".join(p.strip() for p in parts), block, expect))
    return out


def _inline(path: Path, prose: list[tuple[int, str]]) -> list[Snippet]:
    """Inline code spans of the prose lines (a span may wrap over lines; `\\|` in tables is `|`)."""
    text = "\n".join(line for _, line in prose)
    numbers = [number for number, _ in prose]
    out = []
    for match in INLINE.finditer(text):
        line = numbers[text.count("\n", 0, match.start())]
        out.append(Snippet(str(path.name), line, " ".join(match.group(2).replace("\\|", "|").split())))
    return out


# ----------------------------------------------------------------------------- commands in a snippet
def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in a fragment: fall back to words
        return text.split()


def commands_in(snippet: Snippet) -> list[list[str]]:
    """The argument lists after each `character-baker` program token, up to a shell separator."""
    tokens, commands = _tokens(snippet.text), []
    for index, token in enumerate(tokens):
        if token == PROGRAM or token.endswith("/bin/" + PROGRAM):
            args = []
            for arg in tokens[index + 1:]:
                if arg in SEPARATORS or arg.startswith("#"):
                    break
                args.append(arg)
            commands.append(args)
    return commands


def set_keys_in(snippet: Snippet) -> list[str]:
    """The KEY of every `--set KEY=VALUE` (or `--set=KEY=VALUE`) in a snippet."""
    tokens = [t.strip("[]") for t in _tokens(snippet.text)]
    keys = []
    for index, token in enumerate(tokens):
        if token == "--set" and index + 1 < len(tokens) and "=" in tokens[index + 1]:
            keys.append(tokens[index + 1].split("=", 1)[0])
        elif token.startswith("--set=") and token.count("=") >= 2:
            keys.append(token.split("=", 2)[1])
    return keys


# ----------------------------------------------------------------------------- the CLI's own help
@dataclass
class HelpPage:
    """What one command's --help says: exit code, subcommands (for groups) and option names."""

    code: int
    subcommands: set[str] = field(default_factory=set)
    options: set[str] = field(default_factory=set)


_ROW = re.compile(r"^(?:│ |  )([a-z][\w-]*)(?:\s{2,}|\s*│?\s*$)")


def parse_help(code: int, text: str) -> HelpPage:
    """Option names from the help's option rows; subcommand names from its Commands section."""
    page = HelpPage(code)
    section = ""
    for line in text.splitlines():
        header = re.search(r"(Options|Commands|Arguments)", line) if ("─" in line or line.endswith(":")) else None
        if header:
            section = header.group(1)
            continue
        body = line.strip().strip("│").strip().lstrip("*").strip()
        if section == "Options" and body.startswith("-"):
            for token in body.split():
                if not token.startswith("-"):
                    break
                page.options.update(name for name in re.split(r"[,/]", token) if name.startswith("--"))
        elif section == "Commands":
            row = _ROW.match(line)
            if row:
                page.subcommands.add(row.group(1))
    return page


_HELP_PAGES: dict[tuple[str, ...], HelpPage] = {}  # the CLI does not change during a test session


class HelpCache:
    """--help of each command path, run in-process once per session."""

    def __init__(self, run_cli: RunCli):
        self.run_cli = run_cli
        self.pages = _HELP_PAGES

    def page(self, path: tuple[str, ...]) -> HelpPage:
        """The parsed --help of `character-baker PATH`."""
        if path not in self.pages:
            code, out, err = self.run_cli(*path, "--help")
            self.pages[path] = parse_help(code, out + err)
        return self.pages[path]


# ----------------------------------------------------------------------------- the checks
def _clean(token: str) -> str:
    return token.strip("[](),.;:'\"")


def command_problems(args: list[str], helps: HelpCache) -> list[str]:
    """Why `character-baker ARGS` is not a command this CLI has (empty when it is)."""
    problems: list[str] = []
    for path, rest in _command_paths((), args, helps, problems):
        page = helps.page(path)
        name = " ".join((PROGRAM, *path))
        for index, token in enumerate(rest):
            for flag in (part for part in _clean(token).split("|") if part.startswith("--")):
                flag = flag.split("=", 1)[0]
                if flag not in page.options:
                    problems.append(f"`{name}` has no option {flag} (its --help lists {', '.join(sorted(page.options))})")
                elif flag == "--preset" and ("=" in token or index + 1 < len(rest)):
                    problems += preset_problems(_clean(token.split("=", 1)[1] if "=" in token else rest[index + 1]))
    return problems


def _command_paths(path: tuple[str, ...], args: list[str], helps: HelpCache,
                   problems: list[str]) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """(subcommand path, remaining args) for each reading of ARGS; `a|b` alternatives branch."""
    page = helps.page(path)
    if page.code != 0:
        problems.append(f"`{' '.join((PROGRAM, *path, '--help'))}` exits {page.code}")
        return
    if not page.subcommands or not args or args[0].startswith("-"):
        yield path, args
        return
    names = _clean(args[0]).split("|")
    if PLACEHOLDER.match(names[0]):
        return  # e.g. `character-baker COMMAND --help`: nothing definite to check
    for name in names:
        if name not in page.subcommands:
            problems.append(f"`{' '.join((PROGRAM, *path))}` has no subcommand '{name}' "
                            f"(it has {', '.join(sorted(page.subcommands))})")
        else:
            yield from _command_paths((*path, name), args[1:], helps, problems)


def set_key_problems(key: str) -> list[str]:
    """Why `--set KEY=...` would be refused (empty for a real recipe key or a placeholder)."""
    from character_baker.core.errors import UserError
    from character_baker.core.recipes import parse_set_overrides

    if PLACEHOLDER.match(key):
        return []
    try:
        parse_set_overrides([f"{key}=0"])
    except UserError as error:
        return [f"--set {key}: {problem.message} ({problem.fix})" for problem in error.problems]
    return []


def preset_problems(name: str) -> list[str]:
    """Why `--preset NAME` would be refused (empty for a real preset or a placeholder)."""
    from character_baker.core.recipes import PRESETS

    if PLACEHOLDER.match(name) or name in PRESETS:
        return []
    return [f"--preset {name}: no such preset (there are {', '.join(PRESETS)})"]


def snippet_problems(snippet: Snippet, helps: HelpCache) -> list[str]:
    """Every problem of one snippet's commands and --set keys."""
    problems = [p for args in commands_in(snippet) for p in command_problems(args, helps)]
    return problems + [p for key in set_keys_in(snippet) for p in set_key_problems(key)]


def doc_problems(path: Path, helps: HelpCache) -> tuple[list[str], int]:
    """(problems with file:line, number of commands checked) for one Markdown file."""
    problems, checked = [], 0
    snippets = code_snippets(path)
    expected_blocks = {s.block for s in snippets if s.expect_error}
    found_in_expected: set[int | None] = set()
    for snippet in snippets:
        checked += len(commands_in(snippet))
        found = snippet_problems(snippet, helps)
        if snippet.expect_error:
            found_in_expected.update({snippet.block} if found else set())
        else:
            problems += [f"{snippet.file}:{snippet.line}: {problem}" for problem in found]
    for block in sorted(b for b in expected_blocks - found_in_expected if b is not None):
        problems.append(f"{path.name}: code block {block} is marked expect-error but every command in it is valid")
    return problems, checked


# ----------------------------------------------------------------------------- tests
@pytest.fixture
def helps(cli, monkeypatch):
    """--help pages of the CLI, read wide enough that no option name wraps."""
    monkeypatch.setenv("COLUMNS", "200")
    return HelpCache(cli)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_every_command_and_flag_in_the_docs_exists(path, helps):
    problems, checked = doc_problems(path, helps)
    assert not problems, "\n".join(problems)
    if path.name == "README.md":
        assert checked >= 5, f"only {checked} character-baker commands found in README.md: is the parser broken?"


def test_the_check_catches_a_wrong_flag_subcommand_set_key_and_preset(tmp_path, helps):
    doc = tmp_path / "doc.md"
    doc.write_text("\n".join([
        "Run `character-baker train constitutions/pirate.yaml --dry-run --no-such-flag` first.",
        "",
        "```bash",
        "character-baker constitution frobnicate FILE",
        "ACCELERATE_USE_FSDP=true character-baker distill c.yaml \\",
        "  --set distill.lora.rank=8 --preset huge && echo done",
        "```",
        "",
        "| `character-baker merge RUN [--mode fold\\|svd] [--scale 0.5]` | table cell |",
        "",
        "    --set distill.nope=1",
    ]), encoding="utf-8")
    problems, checked = doc_problems(doc, helps)
    text = "\n".join(problems)
    assert checked == 4
    for expected in ("no option --no-such-flag", "no subcommand 'frobnicate'", "--set distill.lora.rank",
                     "--preset huge", "no option --scale", "--set distill.nope"):
        assert expected in text, f"{expected!r} not reported:\n{text}"
    assert len(problems) == 6, text


def test_valid_commands_pass_and_alternatives_are_each_checked(tmp_path, helps):
    doc = tmp_path / "doc.md"
    doc.write_text("\n".join([
        "`character-baker constitution validate\\|score\\|show FILE` and "
        "`character-baker distill C [--data-only\\|--skip-data] [--launcher torchrun --nproc 2]`",
        "",
        "```",
        "$ .venv/bin/character-baker recipe show --preset smoke --set generation.<role>.backend=openai",
        "character-baker train c.yaml --set merge.weights.distill=1.0 --set=distill.beta=0.2  # a comment --nope",
        "```",
        "",
        EXPECT_ERROR,
        "```",
        "$ character-baker recipe show --set distill.bta=1",
        "```",
    ]), encoding="utf-8")
    problems, checked = doc_problems(doc, helps)
    assert problems == [] and checked == 5


def test_an_expect_error_block_without_an_error_is_reported(tmp_path, helps):
    doc = tmp_path / "doc.md"
    doc.write_text(f"{EXPECT_ERROR}\n```\ncharacter-baker recipe show --changed\n```\n", encoding="utf-8")
    problems, _ = doc_problems(doc, helps)
    assert len(problems) == 1 and "expect-error" in problems[0]


# ----------------------------------------------------------------------------- docs/recipes.md's reference
RECIPES_PAGE = ROOT / "docs" / "recipes.md"
REFERENCE_START, REFERENCE_END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"
ROLES = ("teacher", "student", "prompt_writer", "judge")
TRAINING = ("distill", "introspect", "sdft")


def _choices(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return ", ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    return next((found for found in map(_choices, typing.get_args(annotation)) if found), "")


def _cell(value: object) -> str:
    return "`" + (repr(value) if isinstance(value, str) else str(value)).replace("|", "\\|") + "`"


def _fields(model: type[BaseModel], instance: BaseModel | None, prefix: str = "") -> dict[str, tuple[str, str]]:
    """dotted field -> (choices, default), nested sections flattened; list-of-section items as `name[].field`."""
    from character_baker.core.validation import inner_model

    rows: dict[str, tuple[str, str]] = {}
    for name, info in model.model_fields.items():
        value = getattr(instance, name) if instance is not None else info.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            rows.update(_fields(type(value), value, f"{prefix}{name}."))
            continue
        rows[f"{prefix}{name}"] = (_choices(info.annotation), "required" if info.is_required() else _cell(value))
        section = inner_model(info.annotation)
        if section is not None and isinstance(value, list):
            rows.update(_fields(section, None, f"{prefix}{name}[]."))
    return rows


def _table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _side_by_side(names: list[str], instances: list[BaseModel], prefix: str = "") -> str:
    """One table, a column of defaults per section (sections of one shape, e.g. the training stages)."""
    tables = [_fields(type(instance), instance) for instance in instances]
    keys = list(dict.fromkeys(key for table in tables for key in table))
    rows = [[f"`{prefix}{key}`", next(t[key][0] for t in tables if key in t)]
            + [table[key][1] if key in table else "-" for table in tables] for key in keys]
    return _table(["field", "choices", *[f"`{name}`" for name in names]], rows)


def recipe_reference() -> str:
    """Every recipe section and field with its default, generated from `core.config.Recipe`."""
    from character_baker.core.config import Recipe

    recipe, parts, top = Recipe(), [], []
    for name, info in Recipe.model_fields.items():
        value = getattr(recipe, name)
        if name in TRAINING[1:]:
            continue
        if name == TRAINING[0]:
            parts.append("### `distill`, `introspect`, `sdft`\n\n"
                         + _side_by_side(list(TRAINING), [getattr(recipe, n) for n in TRAINING]))
        elif name == "generation":
            own = [[f"`generation.{key}`", choices, default] for key, (choices, default)
                   in _fields(type(value), value).items() if key.split(".")[0] not in ROLES]
            parts.append("### `generation`\n\n" + _table(["field", "choices", "default"], own) + "\n\n"
                         + _side_by_side([f"generation.{role}" for role in ROLES], [getattr(value, r) for r in ROLES]))
        elif isinstance(value, BaseModel):
            rows = [[f"`{name}.{key}`", choices, default] for key, (choices, default) in _fields(type(value), value).items()]
            parts.append(f"### `{name}`\n\n" + _table(["field", "choices", "default"], rows))
        else:
            top.append([f"`{name}`", _choices(info.annotation), _cell(value)])
    return "\n\n".join(["### top level\n\n" + _table(["field", "choices", "default"], top), *parts])


def _page_with_reference(page: str) -> str:
    before, _, rest = page.partition(REFERENCE_START)
    _, _, after = rest.partition(REFERENCE_END)
    return f"{before}{REFERENCE_START}\n{recipe_reference()}\n{REFERENCE_END}{after}"


def test_recipe_reference_matches_config():
    page = RECIPES_PAGE.read_text(encoding="utf-8")
    assert REFERENCE_START in page and REFERENCE_END in page
    assert page == _page_with_reference(page), (
        "docs/recipes.md's field reference is out of date with core/config.py; rewrite it with "
        "`.venv/bin/python -m tests.test_docs_commands`. The block should read:\n\n" + recipe_reference())


def test_recipes_page_describes_every_preset():
    from character_baker.core.recipes import PRESETS

    page = RECIPES_PAGE.read_text(encoding="utf-8")
    missing = [name for name in PRESETS if f"**`{name}`**" not in page]
    assert not missing, f"docs/recipes.md has no paragraph for preset(s) {missing} (start it with **`NAME`**)"


if __name__ == "__main__":
    RECIPES_PAGE.write_text(_page_with_reference(RECIPES_PAGE.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"rewrote the field reference in {RECIPES_PAGE}", file=sys.stderr)
