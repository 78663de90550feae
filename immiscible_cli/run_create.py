"""Making a new run directory: the next numbered one under a root (`create_run`) or one at a given path
(`create_run_at`, refused unless the folder is new, empty or one a crashed create left half made). config.yaml is
written last, so a folder holding it is a whole run (runs.holds_run). The file names are runs.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config
from .files import write_atomic
from .provenance import provenance
from .runs import CHECKPOINTS, CONFIG, META, SAMPLES, Run, RunError, check_text_path, numbered_runs


def next_run_path(root: Path, name: str) -> Path:
    """The directory `create_run` would make now: one more than the highest number under root."""
    highest = max((n for n, _ in numbered_runs(Path(root))), default=-1)
    return Path(root) / f"{highest + 1:05d}-{name}"


def create_run(root: Path, config: Config, argv: list[str] | None = None, device: str = "cpu") -> Run:
    """Make a new numbered run directory with config.yaml and meta.json; never reuses a number."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        path = next_run_path(root, config.name)
        try:
            path.mkdir()
            break
        except FileExistsError:  # another process took this number between listing and mkdir
            continue
    return _populate(path, config, argv, device)


def create_run_at(path: Path, config: Config, argv: list[str] | None = None, device: str = "cpu") -> Run:
    """Make a run directory at exactly `path` (see `check_new_run_dir`)."""
    check_new_run_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    return _populate(path, config, argv, device)


def check_new_run_dir(path: Path) -> None:
    """A RunError, before anything is written, unless `path` can become a new run: a folder that does not exist yet,
    an empty one, or one a crashed `create_run_at` left half made. A run, a file or a folder holding anything else
    is refused and left untouched; so is a path that is not valid UTF-8 (config.yaml, meta.json and the logs
    record it as text)."""
    path = Path(path)
    check_text_path(path, "--run-dir")
    if (path / CONFIG).exists():  # not holds_run: a config.yaml that is not a file is refused too
        raise RunError(f"{path}: already holds a run")
    if path.exists() and not path.is_dir():
        raise RunError(f"{path}: it is a file, not a folder; choose a new or empty folder for --run-dir")
    foreign = [p.name for p in sorted(path.iterdir()) if not _half_made(p)] if path.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise RunError(f"{path}: not empty and not a run of ours (it holds {shown}); choose a new or empty folder "
                       f"for --run-dir")


def _half_made(p: Path) -> bool:
    """What `_populate` writes before config.yaml, so a crash may leave it: meta.json (or its temporary file),
    empty checkpoints/ and samples/."""
    if p.name in (CHECKPOINTS, SAMPLES):
        return p.is_dir() and not any(p.iterdir())
    if p.name == META:
        return _our_meta(p)
    return p.name.startswith((f".{META}.tmp-", f".{CONFIG}.tmp-")) and p.is_file() and not p.is_symlink()


def _our_meta(p: Path) -> bool:
    """A meta.json `_populate` wrote (a regular file holding a JSON object with our `immiscible_version`), not
    another tool's file of the same name."""
    if p.is_symlink() or not p.is_file():
        return False
    try:
        meta = json.loads(p.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and "immiscible_version" in meta and "argv" in meta


def _populate(path: Path, config: Config, argv: list[str] | None, device: str) -> Run:
    (path / CHECKPOINTS).mkdir(exist_ok=True)
    (path / SAMPLES).mkdir(exist_ok=True)
    write_atomic(path / META, (json.dumps(provenance(argv, device), indent=2) + "\n").encode())
    write_atomic(path / CONFIG, config.to_yaml().encode())  # last: a directory with config.yaml is a whole run
    return Run(path)
