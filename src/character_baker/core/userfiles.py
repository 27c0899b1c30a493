"""Reading files a user hands us, as if each one were hostile.

Every file that comes from a user (constitution, recipe, `--prompts`, user datasets, OCT
imports, chat templates) goes through here, so that a bad file is a `UserError` naming the
file, the place and the fix, decided quickly, with nothing written:

    text = read_user_text(path, field="constitution")            # size-limited, UTF-8, no NUL bytes
    for number, line in user_text_lines(path, field="--prompts"):  # streamed, each line checked
    value = parse_json(text, file=path, field="line 3", line=3)     # deep nesting / giant ints are errors

Limits (bytes): `MAX_DOCUMENT_BYTES` for YAML, JSON and templates (a constitution is a few
kilobytes; the largest shipped one is under 20 KB); `MAX_DATASET_BYTES` for JSONL/CSV prompt
files, read line by line, with `MAX_LINE_BYTES` per line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from character_baker.core.errors import Problem, UserError

MAX_DOCUMENT_BYTES = 1 << 20  # 1 MiB
MAX_DATASET_BYTES = 256 << 20  # 256 MiB
MAX_LINE_BYTES = 1 << 20  # 1 MiB
UTF8_BOM = b"\xef\xbb\xbf"


def _size_text(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size:,} bytes"


def check_user_file(path: str | Path, *, field: str, max_bytes: int) -> Path:
    """The path, once it is an existing regular file no larger than `max_bytes`; else a UserError."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UserError.single(str(path), field, "file not found", "check the path") from None
    except OSError as error:
        raise UserError.single(str(path), field, f"cannot read: {error.strerror}", "check the path and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError.single(str(path), field, "is a folder, not a file", "pass the file inside it")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise UserError.single(str(path), field, "is not a regular file (a pipe, socket or device)",
                               "pass a regular file")
    if info.st_size > max_bytes:
        raise UserError.single(str(path), field, f"is {_size_text(info.st_size)}; the limit is {_size_text(max_bytes)}",
                               "pass a smaller file (split a dataset, or keep a constitution to its text)")
    return path


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _binary_problem(path: Path, field: str, data: bytes, base_offset: int = 0, line: int | None = None) -> Problem | None:
    if base_offset == 0 and data.startswith(UTF16_BOMS):
        return Problem(str(path), field, "UTF-16 text (a byte-order mark at byte 0), not UTF-8",
                       "save the file as UTF-8 (e.g. `iconv -f utf-16 -t utf-8 FILE`)", line)
    zero = data.find(b"\x00")
    if zero < 0:
        return None
    return Problem(str(path), field, f"binary data, not text (a NUL byte at byte offset {base_offset + zero})",
                   "pass a UTF-8 text file", line)


def decode_user_bytes(path: str | Path, data: bytes, *, field: str, base_offset: int = 0,
                      line: int | None = None) -> str:
    """`data` decoded as UTF-8 (a leading BOM dropped); a UserError naming the byte offset otherwise."""
    path = Path(path)
    if base_offset == 0 and data.startswith(UTF8_BOM):
        data, base_offset = data[len(UTF8_BOM):], len(UTF8_BOM)
    problem = _binary_problem(path, field, data, base_offset, line)
    if problem is not None:
        raise UserError([problem])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = base_offset + error.start
        bad = data[error.start:error.start + 1].hex()
        where_line = line if line is not None else data.count(b"\n", 0, error.start) + 1
        raise UserError([Problem(str(path), field, f"not UTF-8 text: byte 0x{bad} at byte offset {offset} "
                                 f"cannot be decoded", "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`)",
                                 where_line)]) from None


def read_user_text(path: str | Path, *, field: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """The whole file as text: a regular file, at most `max_bytes`, UTF-8 without NUL bytes."""
    path = check_user_file(path, field=field, max_bytes=max_bytes)
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)  # the file may have grown since stat()
    if len(data) > max_bytes:
        raise UserError.single(str(path), field, f"is larger than the limit of {_size_text(max_bytes)}",
                               "pass a smaller file")
    return decode_user_bytes(path, data, field=field)


def user_text_lines(path: str | Path, *, field: str, max_bytes: int = MAX_DATASET_BYTES,
                    max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the line break) for each line of a large text file, streamed."""
    path = check_user_file(path, field=field, max_bytes=max_bytes)
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(max_line_bytes + 1), b""), start=1):
            if len(raw) > max_line_bytes:
                raise UserError([Problem(str(path), f"line {number}", f"is longer than {_size_text(max_line_bytes)}",
                                         "split it, or pass one record per line", number)])
            if offset + len(raw) > max_bytes:
                raise UserError.single(str(path), field, f"is larger than the limit of {_size_text(max_bytes)}",
                                       "pass a smaller file")
            text = decode_user_bytes(path, raw, field=field, base_offset=offset, line=number)
            offset += len(raw)
            yield number, text.rstrip("\r\n")


def parse_json(text: str, *, file: str | Path, field: str, line: int | None = None, fix: str = "") -> Any:
    """json.loads with every failure (syntax, nesting too deep, numbers too long) as a UserError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        at = line if line is not None else error.lineno
        raise UserError([Problem(str(file), field, f"not valid JSON: {error.msg} (column {error.colno})",
                                 fix or "fix the JSON at that line", at)]) from None
    except RecursionError:
        raise UserError([Problem(str(file), field, "JSON nested too deeply", fix or "flatten the structure",
                                 line)]) from None
    except ValueError as error:  # e.g. an integer literal of more than 4,300 digits
        raise UserError([Problem(str(file), field, f"unreadable JSON value: {error}", fix or "fix the value",
                                 line)]) from None


def is_readable_file(path: str | Path) -> bool:
    """True for an existing regular file (not a folder, pipe or device)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
