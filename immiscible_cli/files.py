"""Small file helpers with crash-safe semantics: whole-file atomic writes and append-only JSONL.

Used by the run directory, checkpoints, images and plots. Errors are `FileFormatError`s that name the file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError


class FileFormatError(UserError):
    """A file of ours that cannot be parsed; the message names the file and the line."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one row and flush it to disk, so a crash never leaves half a line behind a good one."""
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a truncated last line (a crash mid-write) is skipped, other bad lines are errors."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise FileFormatError(f"{path}: line {i + 1} is not valid JSON; fix or remove that line") from None
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace a JSONL file with `rows`, atomically."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
