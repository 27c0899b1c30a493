"""User prompt sources: JSONL or CSV files, or any `datasets` dataset, with a column mapping."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

from character_baker.core.config import UserDataset
from character_baker.core.errors import UserError
from character_baker.core.userfiles import parse_json, user_text_lines


def _rows_from_file(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        for number, line in user_text_lines(path, field="prompts.user_datasets.path"):
            if line.strip():
                row = parse_json(line, file=path, field=f"line {number}", line=number,
                                 fix="write one JSON object per line")
                if not isinstance(row, dict):
                    raise UserError.single(str(path), f"line {number}", "not a JSON object",
                                           'write one object per line, e.g. {"prompt": "..."}')
                yield row
    elif path.suffix == ".csv":
        yield from _csv_rows(path)
    else:
        raise UserError.single(str(path), "prompts.user_datasets.path", "unsupported file type",
                               "use a .jsonl or .csv file, or a `datasets` dataset name/folder")


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    """CSV rows as dicts; undecodable bytes, NUL bytes and oversize fields are user errors with the line."""
    lines = (text + "\n" for _, text in user_text_lines(path, field="prompts.user_datasets.path"))
    reader = csv.DictReader(lines)
    try:
        yield from reader
    except csv.Error as error:
        raise UserError.single(str(path), f"line {reader.line_num}", f"not valid CSV: {error}",
                               "fix the row (quote fields that hold commas or line breaks)") from None


def _rows_from_datasets(spec: UserDataset) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.path, split=spec.split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise UserError.single(spec.path, "prompts.user_datasets.path", f"cannot load dataset: {error}",
                               "pass a local .jsonl/.csv file or a dataset that is cached locally") from None
    yield from dataset


def _local_path(spec: UserDataset, relative_to: Path | None) -> Path:
    """The dataset's path as given, or next to the constitution when it is relative and not found as given."""
    path = Path(spec.path)
    if not path.is_absolute() and relative_to is not None and not path.exists():
        path = relative_to.parent / path
    return path


def load_user_dataset(spec: UserDataset, relative_to: Path | None = None) -> list[dict[str, str]]:
    """Rows of a user dataset as {'prompt', 'category', 'source'} using the column mapping."""
    path = _local_path(spec, relative_to)
    rows = _rows_from_file(path) if path.exists() and not path.is_dir() else _rows_from_datasets(spec)
    items = []
    for number, row in enumerate(rows, 1):
        if spec.prompt_column not in row:
            raise UserError.single(spec.path, "prompts.user_datasets.prompt_column",
                                   f"row {number} has no column '{spec.prompt_column}' (columns: {', '.join(row)})",
                                   "set prompt_column to the column holding the prompt")
        text = str(row[spec.prompt_column] or "").strip()
        if text:
            category = str(row.get(spec.category_column) or "user") if spec.category_column else "user"
            items.append({"prompt": text, "category": category, "source": f"user:{Path(spec.path).name}"})
        if spec.limit and len(items) >= spec.limit:
            break
    return items


def check_user_dataset_files(specs: list[UserDataset], relative_to: Path | None = None) -> None:
    """Read every user dataset that is a local file, so a bad one is a UserError before any work starts."""
    for spec in specs:
        path = _local_path(spec, relative_to)
        if path.exists() and not path.is_dir():
            load_user_dataset(spec, relative_to)
