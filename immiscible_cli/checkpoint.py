"""Checkpoints: the snapshot files of a run directory, how they are written (atomically), listed, selected, pruned,
read (weights_only, checked against the run, with fallback to an older one) and resumed from.

What a snapshot holds and whether it fits the run: checkpoint_format.py; moving one between devices:
checkpoint_devices.py. Snapshots live in RUN/checkpoints/snapshot-<kimg>kimg.pt. A kept network
(train.keep_network) is RUN/network-<kimg>kimg.pt, written at the end of training; `weights` lists it beside the
snapshots, so `eval` and `sample` use it like one (studies commit it, not their snapshots); resume never does.
A snapshot that does not fit the run is skipped by `resume` and named by `sample`/`eval` with the checkpoints that
do fit.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed
from .checkpoint_format import FORMAT, NETWORK_FORMAT, Expected, mismatches
from .errors import UserError
from .files import own_file_problem, write_atomic
from .runs import Run, kimg_tag

_NETWORK = re.compile(r"^network-(\d+\.\d{3})kimg\.pt$")
_SNAPSHOT = re.compile(r"^snapshot-(\d+\.\d{3})kimg\.pt$")
_LEFTOVER = re.compile(r"^\..+\.tmp-\d+$")  # files.write_atomic's temporary name: .<file>.tmp-<pid>


@dataclass(frozen=True)
class Checkpoint:
    kimg: float
    path: Path


def path_for(run: Run, kimg: float) -> Path:
    """Where the snapshot at `kimg` lives: checkpoints/snapshot-000012.800kimg.pt."""
    return run.checkpoints_dir() / f"snapshot-{kimg_tag(kimg)}.pt"


def list_checkpoints(run: Run) -> list[Checkpoint]:
    """The run's snapshots, oldest first."""
    folder = run.checkpoints_dir()
    found = []
    for p in folder.glob("snapshot-*kimg.pt") if folder.is_dir() else ():
        m = _SNAPSHOT.match(p.name)
        if m:
            found.append(Checkpoint(float(m.group(1)), p))
    return sorted(found, key=lambda c: c.kimg)


def kept_network(run: Run) -> Checkpoint | None:
    """The run's kept network (RUN/network-<kimg>kimg.pt), or None."""
    found = [Checkpoint(float(m.group(1)), p) for p in run.path.glob("network-*kimg.pt")
             if (m := _NETWORK.match(p.name)) and p.is_file()]
    return max(found, key=lambda c: c.kimg) if found else None


def weights(run: Run) -> list[Checkpoint]:
    """Everything `eval` and `sample` can load, oldest first: the snapshots and the kept network (where no snapshot
    has its kimg)."""
    found = list_checkpoints(run)
    kept = kept_network(run)
    if kept is not None and not any(abs(c.kimg - kept.kimg) < 5e-4 for c in found):
        found = sorted([*found, kept], key=lambda c: c.kimg)
    return found


def save_network(run: Run, state: dict[str, Any]) -> Path:
    """Write the kept network (atomically) and remove an older one (a run trained further keeps its last)."""
    path = run.path / f"network-{kimg_tag(float(state['kimg']))}.pt"
    buffer = io.BytesIO()
    torch.save({"format": NETWORK_FORMAT, **state}, buffer)
    write_atomic(path, buffer.getvalue())
    for old in run.path.glob("network-*kimg.pt"):
        if old != path and _NETWORK.match(old.name):
            old.unlink(missing_ok=True)
    return path


class CheckpointError(UserError):
    """No readable checkpoint where one was asked for, or one that does not fit the run."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Serialise to memory first, then write atomically: a crash leaves the previous file, never half of this one."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    write_atomic(path, buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu", expected: Expected | None = None) -> dict[str, Any]:
    """Read one snapshot (weights_only=True); CheckpointError when it is truncated, corrupt or not ours, or (given
    `expected`) does not fit the run: the first three differences, in one line. A symlink leaving the folder that
    holds it, a FIFO or anything but a regular file is refused unopened (files.own_file_problem)."""
    problem = own_file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: not used as a checkpoint: {problem}; replace it with a snapshot file or "
                              f"remove it")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        reason = " ".join(str(e).split())[:120]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, NETWORK_FORMAT):
        raise CheckpointError(f"{path}: not an immiscible snapshot")
    problems = mismatches(state, expected) if expected is not None else []
    if problems:
        more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"{path}: does not fit this run ({'; '.join(problems[:3])}{more})")
    return state


def usable(run: Run, expected: Expected, exclude: Path | None = None) -> list[Checkpoint]:
    """The run's snapshots that load and fit `expected`, oldest first (each is read: meant for error messages)."""
    found = []
    for ckpt in weights(run):
        if ckpt.path != exclude:
            try:
                load(ckpt.path, "cpu", expected)
            except CheckpointError:
                continue
            found.append(ckpt)
    return found


def remove_leftovers(run: Run) -> list[Path]:
    """Delete the temporary files of atomic writes that were killed (.<file>.tmp-PID: snapshots, the kept network,
    config.yaml, meta.json, rewritten logs, sample grids) in the run, checkpoints/ and samples/. Call it only while
    holding the run's train lock: then nothing of the run is being written. Symlinks are left alone."""
    removed = []
    for folder in (run.path, run.checkpoints_dir(), run.path / "samples"):
        for path in folder.iterdir() if folder.is_dir() and not folder.is_symlink() else ():
            if _LEFTOVER.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return sorted(removed)


@dataclass
class Loaded:
    checkpoint: Checkpoint
    state: dict[str, Any]
    skipped: list[str]  # one message per newer checkpoint that could not be read


def load_newest(run: Run, map_location: str | torch.device = "cpu",
                expected: Expected | None = None) -> Loaded | None:
    """The newest readable snapshot of a run that fits `expected` (None when it has none); newer ones that are
    unreadable or do not fit are reported."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run)):
        try:
            return Loaded(ckpt, load(ckpt.path, map_location, expected), skipped)
        except CheckpointError as e:
            skipped.append(str(e))
    if skipped:
        raise CheckpointError(f"{run.path}: no usable checkpoint ({len(skipped)} skipped; the newest: {skipped[0]}); "
                              f"restore config.yaml if it was edited after training, or start a new run")
    return None


def parse_spec(spec: str) -> float | None:
    """`--ckpt`: `latest` -> None, a kimg -> float; CheckpointError for anything else (text, nan, inf, < 0)."""
    try:
        kimg = None if spec == "latest" else float(spec)
    except ValueError:
        kimg = math.nan
    if kimg is not None and not (math.isfinite(kimg) and kimg >= 0):
        raise CheckpointError(f"--ckpt {spec}: expected `latest` or a kimg number >= 0 (e.g. --ckpt 2000)")
    return kimg


def select(run: Run, spec: str) -> Checkpoint:
    """`latest` or a kimg (the snapshot nearest to it, within 0.5 kimg) -> a checkpoint of the run."""
    kimg = parse_spec(spec)  # a bad spec is reported before anything about the run
    available = weights(run)
    if not available:
        raise CheckpointError(f"{run.path}: no checkpoints yet (train it first, or wait for its first snapshot)")
    if kimg is None:
        return available[-1]
    nearest = min(available, key=lambda c: abs(c.kimg - kimg))
    if abs(nearest.kimg - kimg) > 0.5:
        listed = ", ".join(f"{c.kimg:g}" for c in available)
        raise CheckpointError(f"--ckpt {spec}: {run.path} has no snapshot at {spec} kimg (available: {listed})")
    return nearest


def prune(run: Run, keep_last: int, keep_every_kimg: float, batch_size: int = 1) -> list[Path]:
    """Delete snapshots beyond the newest `keep_last`, except those of the step that reached or crossed a multiple
    of keep_every_kimg (with batch_size images per step, snapshots fall on the first step past a multiple)."""
    removed = []
    available = list_checkpoints(run)
    every = round(keep_every_kimg * 1000)
    for ckpt in available[:-keep_last] if keep_last < len(available) else []:
        nimg = round(ckpt.kimg * 1000)
        if every > 0 and nimg // every > (nimg - batch_size) // every:
            continue
        ckpt.path.unlink(missing_ok=True)
        removed.append(ckpt.path)
    return removed


@dataclass
class Resumed:
    checkpoint: Checkpoint
    skipped: list[str]  # newer checkpoints that could not be read
    dropped_rows: int  # metrics/FID rows written after the checkpoint, removed so the resumed run writes them again


def resume(run: Run, load_state: Callable[[dict[str, Any]], None],
           map_location: str | torch.device = "cpu", expected: Expected | None = None) -> Resumed | None:
    """Hand the newest readable snapshot that fits `expected` to `load_state` and cut the run's logs back to its
    kimg; None when the run has no snapshot yet (a fresh start). One path for one process or several (one process
    is the case W = 1): rank 0 reads the snapshot (to `map_location`; with several processes to the CPU, to send it
    to every rank, so the run directory need not be shared), every rank hands it to `load_state` (the same snapshot
    everywhere: an error there is the same on every rank), rank 0 cuts the logs back."""
    where = map_location if distributed.world() == 1 else "cpu"
    loaded = distributed.on_main(lambda: load_newest(run, where, expected))
    if loaded is None:
        return None
    try:
        load_state(loaded.state)
    except UserError as e:
        raise distributed.everywhere(e)
    dropped = distributed.on_main(lambda: run.truncate_after(float(loaded.state["nimg"]) / 1000))
    return Resumed(loaded.checkpoint, loaded.skipped, dropped)
