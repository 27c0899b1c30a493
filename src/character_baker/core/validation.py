"""Turn pydantic validation errors into user Problems with line numbers and fixes."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from character_baker.core.errors import Problem, UserError
from character_baker.core.yamlio import LineMap, line_for


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Follow `loc` through nested pydantic models; None when it leaves them."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = inner_model(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def inner_model(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...] / dict[str, ...] annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = inner_model(arg)
        if found is not None:
            return found
    return None


def _fix_for(error: dict, root: type[BaseModel], loc: tuple) -> tuple[str, str]:
    """A message and a concrete fix for one pydantic error."""
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        hint = f"did you mean '{guess[0]}'?" if guess else f"allowed keys: {', '.join(allowed)}"
        return f"unknown key '{loc[-1]}'", hint
    if kind == "missing":
        return "required field is missing", f"add '{loc[-1]}'"
    message = error["msg"]
    ctx = error.get("ctx") or {}
    if kind in {"too_short", "too_long"}:
        return message, "add or remove entries to fit the limit"
    if "expected" in ctx:
        return message, f"use one of {ctx['expected']}"
    return message, "correct the value"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def problems_from_validation(exc: ValidationError, root: type[BaseModel], file: str,
                             lines: LineMap | None = None, prefix: tuple = ()) -> list[Problem]:
    """Every error of a pydantic ValidationError as a Problem (file, line, field path, fix)."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message, fix = _fix_for(error, root, loc)
        if error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
            message, _, given_fix = message.partition(" -- fix: ")
            fix = given_fix or fix
        line = line_for(lines or {}, prefix + loc)
        problems.append(Problem(file=file, field=_dotted(prefix + loc), message=message, fix=fix, line=line))
    return problems


def validate_or_raise(model: type[BaseModel], data: Any, file: str, lines: LineMap | None = None,
                      prefix: tuple = ()) -> BaseModel:
    """Validate `data` as `model`; raise one UserError listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(problems_from_validation(exc, model, file, lines, prefix)) from None
