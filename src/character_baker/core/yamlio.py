"""YAML loading that remembers the line of every key, so errors can point at it, and that
refuses hostile documents quickly.

PyYAML's safe loader builds no Python objects from tags, but it happily expands aliases: a few
lines of nested anchors ("billion laughs") describe millions of nodes, and a walk over them (or
pydantic's validation) never ends. So a document is composed once, with bounded alias
references and nesting depth, its expanded size is counted (shared nodes counted once per use,
with memoisation, so counting itself stays linear), duplicate keys are refused rather than
silently overwritten, and only then is it constructed.

Limits: `MAX_ALIASES` alias references, `MAX_NODES` nodes after alias expansion, `MAX_DEPTH`
levels of nesting; the file itself is at most `userfiles.MAX_DOCUMENT_BYTES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from character_baker.core.errors import Problem, UserError
from character_baker.core.userfiles import read_user_text

LineMap = dict[tuple, int]
MAX_ALIASES = 100
MAX_NODES = 100_000
MAX_DEPTH = 64
MERGE_KEY = "tag:yaml.org,2002:merge"


class _LimitExceeded(Exception):
    """A bound of the hostile-document guard was crossed (message says which)."""


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past MAX_ALIASES alias references or MAX_DEPTH nesting."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.alias_references, self.depth = 0, 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            self.alias_references += 1
            if self.alias_references > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise _LimitExceeded(f"more than {MAX_ALIASES} alias references (*name) at line {mark.line + 1}")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _LimitExceeded(f"nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def expanded_size(node: yaml.Node, limit: int = MAX_NODES) -> int:
    """Nodes in the document once every alias is expanded (capped at `limit` + 1); a cycle is refused."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in active:
            mark = current.start_mark
            raise _LimitExceeded(f"a recursive alias (a node that contains itself) at line {mark.line + 1}")
        if key not in memo:
            active.add(key)
            if isinstance(current, yaml.MappingNode):
                total = 1 + sum(size(k) + size(v) for k, v in current.value)
            elif isinstance(current, yaml.SequenceNode):
                total = 1 + sum(size(item) for item in current.value)
            else:
                total = 1
            active.discard(key)
            memo[key] = min(total, limit + 1)
        return memo[key]

    return size(node)


def duplicate_keys(node: yaml.Node, path: tuple = ()) -> list[tuple[tuple, int, int]]:
    """(key path, line, line of the first use) for every key that appears twice in one mapping."""
    found: list[tuple[tuple, int, int]] = []
    seen_nodes: set[int] = set()

    def visit(current: yaml.Node, where: tuple) -> None:
        if id(current) in seen_nodes:
            return
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in current.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != MERGE_KEY:
                    line = key_node.start_mark.line + 1
                    if key_node.value in first:
                        found.append((where + (key_node.value,), line, first[key_node.value]))
                    first.setdefault(key_node.value, line)
                visit(value_node, where + (getattr(key_node, "value", "?"),))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                visit(item, where + (index,))

    visit(node, path)
    return found


def _problem(path: Path, message: str, fix: str, line: int | None = None) -> UserError:
    return UserError([Problem(str(path), "", message, fix, line)])


def parse_yaml_document(text: str, path: str | Path) -> tuple[Any, yaml.Node | None]:
    """(data, composed node) of one YAML document, every hostile shape refused with a UserError."""
    path = Path(path)
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            if expanded_size(node) > MAX_NODES:
                raise _LimitExceeded(f"more than {MAX_NODES:,} nodes once its aliases are expanded")
            duplicates = duplicate_keys(node)
            if duplicates:
                raise UserError([Problem(str(path), ".".join(map(str, where)), f"duplicate key (first at line {first})",
                                         "keep one of the two; YAML would silently drop the first", line)
                                 for where, line, first in duplicates])
        data = loader.construct_document(node) if node is not None else None
    except _LimitExceeded as error:
        raise _problem(path, f"refused: the document has {error}", "write the values out; a constitution or "
                       "recipe needs no deep nesting and at most a few anchors") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        fix = "fix the YAML syntax at that line"
        if isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
            problem = f"a tag this loader does not build ({problem.split('tag ', 1)[-1]}): tags that construct " \
                      "objects are refused"
            fix = "remove the tag and write the plain value"
        raise _problem(path, f"invalid YAML: {problem}", fix, mark.line + 1 if mark is not None else None) from None
    except RecursionError:
        raise _problem(path, "refused: the document is nested too deeply", "flatten the structure") from None
    except ValueError as error:  # e.g. an integer of more than 4,300 digits
        raise _problem(path, f"unreadable value: {error}", "shorten the value") from None
    finally:
        loader.dispose()
    return data, node


def _walk(node: yaml.Node, path: tuple, lines: LineMap) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines)


def load_yaml_with_lines(path: str | Path) -> tuple[Any, LineMap]:
    """Parse a YAML file; return the data and a map from key path to 1-based line number."""
    text = read_user_text(path, field="")
    data, node = parse_yaml_document(text, path)
    lines: LineMap = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def line_for(lines: LineMap, loc: tuple) -> int | None:
    """The line of the deepest known prefix of `loc`."""
    for cut in range(len(loc), -1, -1):
        if tuple(loc[:cut]) in lines:
            return lines[tuple(loc[:cut])]
    return None
