"""Small file helpers with crash-safe semantics: whole-file atomic writes and append-only JSONL.

Used by the run directory, checkpoints, images and plots. Errors are `FileFormatError`s that name the file and line.

A JSONL file holds one row (a JSON object) per line. A crash mid-append can leave the last line cut off (no newline,
not JSON): readers warn on stderr and ignore it (`read_jsonl` never writes), and the next writer first moves it to
`<file>.damaged` (`repair_jsonl`), so a new row is never glued onto half of an old one. Rows are checked against a
`RowSchema` where the reader gives one.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

from .errors import UserError, describe_os_error

DAMAGED = ".damaged"  # suffix of the file beside a JSONL file that keeps the cut-off lines its writers removed


class FileFormatError(UserError):
    """A file of ours that cannot be parsed; the message names the file and the line."""


def own_file_problem(path: Path, root: Path | None = None) -> str | None:
    """Why `path` must not be read, written, repaired or locked by us, in a few words; None when it may be: it does
    not exist, or it is a regular file that lies inside `root` (default: the folder holding it) after symlinks
    are followed. A symlink that leaves `root` (to another user's file, a system file) and anything but a regular
    file (a FIFO would hang a reader, a device or socket is not ours) are refused."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(os.path.realpath(root if root is not None else path.parent)):
            return f"it is a symlink to {target}, outside {root if root is not None else path.parent}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # a dangling symlink inside root: writing creates its target there
        return None
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        return f"it is {kind}, not a regular file"
    return None


class ForeignFileError(UserError):
    """A file a run would write, repair, lock or read that is a symlink leaving its folder or not a regular file."""


def check_own_file(path: Path, root: Path | None = None) -> None:
    """ForeignFileError (one line naming the file and what to do) when `own_file_problem` finds one."""
    problem = own_file_problem(path, root)
    if problem:
        raise ForeignFileError(f"{path}: {problem}; nothing is written through it: replace it with a regular file "
                               f"(or remove it)")


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers see the old or the new file, never half.
    `data`: the bytes, or pieces of them written in order (a large file need not be joined in memory first)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a failed write() names no file: name the one the caller asked for
        e.filename = e.filename if e.filename is not None else str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# JSON kinds a RowSchema can ask for, with the words its errors use
_KINDS = {
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "integer": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "string": ("a string", lambda v: isinstance(v, str)),
    "null": ("null", lambda v: v is None),
}


@dataclass(frozen=True)
class RowSchema:
    """The keys the readers of a JSONL file rely on: `required` ones and `optional` ones (checked when present),
    each mapped to the JSON kinds it may hold ("number" (NaN included), "integer", "string", "null")."""

    required: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    optional: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def problem(self, row: dict[str, Any]) -> str | None:
        """What is wrong with `row`, in a few words; None when it fits."""
        missing = [key for key in self.required if key not in row]
        if missing:
            return f"the row has no '{missing[0]}'"
        for key, kinds in {**self.optional, **self.required}.items():
            if key in row and not any(_KINDS[kind][1](row[key]) for kind in kinds):
                wanted = " or ".join(_KINDS[kind][0] for kind in kinds)
                return f"'{key}' is {json.dumps(row[key])[:40]}, expected {wanted}"
        return None


_CUT = object()  # what _loads returns for a line that is not JSON


def _loads(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError for bytes that are not text, or
        return _CUT  # nesting past the recursion limit: not a row of ours either


def _row(path: Path, number: int, value: Any, schema: RowSchema | None) -> dict[str, Any]:
    if value is _CUT:
        raise FileFormatError(f"{path}: line {number} is not valid JSON; fix or remove that line")
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: line {number} is not a JSON object; fix or remove that line")
    problem = schema.problem(value) if schema is not None else None
    if problem:
        raise FileFormatError(f"{path}: line {number}: {problem}; fix or remove that line")
    return value


def read_jsonl(path: Path, schema: RowSchema | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file (none when it does not exist). A cut-off last line (a crash mid-append) is reported on
    stderr and ignored; any other line that is not a JSON object, or a row that does not fit `schema`, is a
    FileFormatError naming the file and line. Never writes."""
    if not path.is_file():
        return []
    *lines, tail = path.read_bytes().split(b"\n")  # tail: the bytes after the last newline, b"" in a whole file
    rows = [_row(path, number, _loads(line), schema) for number, line in enumerate(lines, 1) if line.strip()]
    if tail.strip():
        value = _loads(tail)
        if value is _CUT:
            print(f"warning: {path}: line {len(lines) + 1} is cut off (a crash while it was written?); ignoring "
                  f"it (the next write moves it to {path.name}{DAMAGED})", file=sys.stderr)
        else:  # a whole row that only lacks its newline
            rows.append(_row(path, len(lines) + 1, value, schema))
    return rows


def _end_at_line_end(f: BinaryIO, path: Path) -> None:
    """Make the file `f` (open for reading and writing) end with a newline: a cut-off last line is moved to
    <file>.damaged and cut, a whole row that only lacks its newline gets one."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    start = size
    while start > 0:  # back to the byte after the last newline
        step = min(start, 1 << 16)
        f.seek(start - step)
        found = f.read(step).rfind(b"\n")
        if found >= 0:
            start = start - step + found + 1
            break
        start -= step
    f.seek(start)
    tail = f.read()
    if not tail.strip() or _loads(tail) is not _CUT:  # blank, or a whole row: readers skip or read it
        f.seek(0, os.SEEK_END)
        f.write(b"\n")
    else:
        damaged = path.with_name(path.name + DAMAGED)
        check_own_file(damaged)
        with open(damaged, "ab") as kept:  # the copy is on disk before anything is cut
            kept.write(tail + b"\n")
            kept.flush()
            os.fsync(kept.fileno())
        f.truncate(start)
        print(f"warning: {path}: moved its cut-off last line (a crash while it was written?) to {damaged.name}",
              file=sys.stderr)
    f.flush()
    os.fsync(f.fileno())


def repair_jsonl(path: Path) -> None:
    """Before a JSONL file is rewritten or appended to: move a last line a crash cut off to <file>.damaged. A file
    that is a symlink leaving its folder or not a regular file is refused (`check_own_file`), never cut."""
    check_own_file(path)
    if path.is_file():
        with open(path, "r+b") as f:
            _end_at_line_end(f, path)


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one row and flush it to disk, after repairing a last line a crash cut off (`repair_jsonl`), so a new
    row is never glued onto half of an old one. Refuses a symlink leaving the folder or a non-regular file
    (`check_own_file`)."""
    check_own_file(path)
    with open(path, "a+b") as f:
        _end_at_line_end(f, path)
        f.write((json.dumps(row, sort_keys=False) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace a JSONL file with `rows`, atomically."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems


def check_writable(path: Path, kind: str = "file", option: str | None = None, append: bool = False) -> None:
    """Fail now, before minutes of work, when results could not be written to `path` (a "file" or a "folder").

    Refuses a folder where a file is wanted (and the reverse), a name over NAME_MAX bytes, a file on the way; then
    creates, writes (4 KiB, synced) and removes a probe file, named as long as the file, in the folder that will
    hold `path` (the nearest one that exists: the writer makes the rest), so a read-only or full disk, a missing
    permission or a name too long for the file system surface here; `path` itself is never created or removed.
    With `append`, an existing file must also open for appending. The error names `option` and the path
    (errors.describe_os_error: exit 4 for the disk and permissions, 2 for a bad name).
    """
    path = Path(path)
    where = f"{option} {path}" if option else str(path)
    if any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):
        raise UserError(f"{where}: a name in it is longer than {NAME_MAX} bytes; choose a shorter path")
    try:
        if kind == "file" and path.is_dir():
            raise UserError(f"{where}: it is a folder, not a file; give a file path")
        if kind == "folder" and path.exists() and not path.is_dir():
            raise UserError(f"{where}: it is a file, not a folder; give a folder")
        folder = path if kind == "folder" else path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"{where}: {folder} is a file, not a folder; choose another path")
        probe = f".immiscible-probe-{os.getpid()}-"  # as long as the file's name: the same length limit applies
        probe = folder / probe.ljust(len(os.fsencode(path.name)) if kind == "file" else 0, "x")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        if append and kind == "file" and path.is_file():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as e:
        raise describe_os_error(e, where) from None
