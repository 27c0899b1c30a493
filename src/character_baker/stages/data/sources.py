"""User prompt sources: JSONL or CSV files, or any `datasets` dataset, with a column mapping."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from character_baker.core.config import UserDataset
from character_baker.core.errors import UserError


def _rows_from_file(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise UserError.single(str(path), f"line {number}", f"not valid JSON: {error.msg}",
                                               "write one JSON object per line") from None
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)
    else:
        raise UserError.single(str(path), "prompts.user_datasets.path", "unsupported file type",
                               "use a .jsonl or .csv file, or a `datasets` dataset name/folder")


def _rows_from_datasets(spec: UserDataset) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.path, split=spec.split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise UserError.single(spec.path, "prompts.user_datasets.path", f"cannot load dataset: {error}",
                               "pass a local .jsonl/.csv file or a dataset that is cached locally") from None
    yield from dataset


def load_user_dataset(spec: UserDataset, relative_to: Path | None = None) -> list[dict[str, str]]:
    """Rows of a user dataset as {'prompt', 'category', 'source'} using the column mapping."""
    path = Path(spec.path)
    if not path.is_absolute() and relative_to is not None and not path.exists():
        path = relative_to.parent / path
    rows = _rows_from_file(path) if path.is_file() else _rows_from_datasets(spec)
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
