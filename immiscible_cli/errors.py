"""The exception types the CLI turns into a clean one-line message and a documented exit code.

Every module raises a subclass of `UserError` for problems the user can fix (a bad preset, a missing dataset, a path
that is not a run, FID weights that cannot be found). Its message is one line per problem, naming the file or field
and what to do. Anything else is a bug and keeps its traceback.

Exit codes (the README lists them): 2 bad input (`UserError`), 3 a non-finite training loss
(`train_loop.TrainingDiverged`), 4 the environment failed us: the disk is full, a folder is read-only, a path cannot be
written (`EnvironmentFailure`), or memory ran out (`OutOfMemory`: the message names the batch field to lower; the
same input fits a larger machine, so it is the environment's limit, not bad input).
"""

from __future__ import annotations

import errno
import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_ENVIRONMENT = 4


class UserError(Exception):
    """A problem with the user's input: reported as `error: <message>`, exit code 2."""

    exit_code = EXIT_BAD_INPUT


class MetricsError(UserError):
    """Base of every metrics error (FID weights, statistics, references); one line saying what is wrong and what to do."""


class EnvironmentFailure(UserError):
    """The machine refused a write or a read we need (disk full, read-only, permissions): exit code 4."""

    exit_code = EXIT_ENVIRONMENT


_OS_PROBLEMS = {
    errno.ENOSPC: "the disk is full; free space and run the command again",
    errno.EDQUOT: "the disk quota is exceeded; free space and run the command again",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.EISDIR: "it is a folder, not a file; choose a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
}


def describe_os_error(e: OSError, path: object = None) -> EnvironmentFailure | UserError:
    """One-line error for an OSError: the path and the problem. Disk and permission problems are environment
    failures (exit 4); a bad path name (too long, a folder where a file is wanted) is bad input (exit 2)."""
    where = path if path is not None else (e.filename or "a file")
    problem = _OS_PROBLEMS.get(e.errno or -1, e.strerror or str(e))
    cls = UserError if e.errno in (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR) else EnvironmentFailure
    return cls(f"{where}: {problem}")


class OutOfMemory(EnvironmentFailure):
    """A batch did not fit in (GPU or host) memory: exit code 4, naming the field to lower."""


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (CUDA, MPS) or the CPU allocator's RuntimeError ("not enough memory", or
    "can't allocate memory" under a memory limit); torch not imported."""
    text = str(e)
    lowered = text.lower()
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
        words in lowered for words in ("out of memory", "not enough memory", "can't allocate memory",
                                       "cannot allocate memory")))  # the last two: CPU allocator, mmap


@contextmanager
def names_memory_field(field: str, value: Any = None, doing: str = "") -> Iterator[None]:
    """Turn running out of memory inside the block into OutOfMemory: `out of memory <doing>; lower <field> (now
    <value>)`. Anything else passes through unchanged."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        now = f" (now {value})" if value is not None else ""
        raise OutOfMemory(f"out of memory{' ' + doing if doing else ''}; lower {field}{now}") from None


def lowers_on_oom(field: str, doing: str = "",
                  value: Callable[[Any], Any] | None = None) -> Callable[[Callable], Callable]:
    """Method decorator: running out of memory in it names `field`, a `section.name` of `self.cfg`, and its value
    (or `value(self)`, when given) (names_memory_field)."""
    section, name = field.split(".")

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            now = value(self) if value is not None else getattr(getattr(self.cfg, section), name)
            with names_memory_field(field, now, doing):
                return method(self, *args, **kwargs)
        return wrapper

    return decorate
