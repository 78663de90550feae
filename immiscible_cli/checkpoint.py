"""Checkpoints: the snapshot files of a run directory, what they hold, how they are written (atomically), listed,
selected, pruned, read (weights_only, with fallback to an older one) and resumed from.

A snapshot is one `torch.save`d dict of tensors and plain values, so `torch.load(weights_only=True)` reads it:
    format, kimg, nimg, step, train_s, config (the resolved config as a dict), config_digest,
    net, ema (state_dicts), optimizer (state_dict),
    rng {"flips", "timesteps", "noise", "labels": generator states (trainer.STREAMS), "torch": CPU state (dropout),
         "cuda": [per-device states]}, data {"epoch", "position"}.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError
from .files import write_atomic
from .runs import Run, kimg_tag

FORMAT = "immiscible-snapshot-v1"
_SNAPSHOT = re.compile(r"^snapshot-(\d+\.\d{3})kimg\.pt$")


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


class CheckpointError(UserError):
    """No readable checkpoint where one was asked for."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Serialise to memory first, then write atomically: a crash leaves the previous file, never half of this one."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    write_atomic(path, buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one snapshot (weights_only=True); CheckpointError when it is truncated, corrupt or not ours."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an immiscible snapshot")
    return state


@dataclass
class Loaded:
    checkpoint: Checkpoint
    state: dict[str, Any]
    skipped: list[str]  # one message per newer checkpoint that could not be read


def load_newest(run: Run, map_location: str | torch.device = "cpu") -> Loaded | None:
    """The newest readable snapshot of a run (None when it has none); unreadable newer ones are reported."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run)):
        try:
            return Loaded(ckpt, load(ckpt.path, map_location), skipped)
        except CheckpointError as e:
            skipped.append(str(e))
    if skipped:
        raise CheckpointError(f"{run.path}: no readable checkpoint ({len(skipped)} unreadable: {skipped[0]})")
    return None


def select(run: Run, spec: str) -> Checkpoint:
    """`latest` or a kimg (the snapshot nearest to it, within 0.5 kimg) -> a checkpoint of the run."""
    available = list_checkpoints(run)
    if not available:
        raise CheckpointError(f"{run.path}: no checkpoints yet (train it first, or wait for its first snapshot)")
    if spec == "latest":
        return available[-1]
    try:
        kimg = float(spec)
    except ValueError:
        raise CheckpointError(f"--ckpt {spec}: expected `latest` or a kimg number") from None
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
           map_location: str | torch.device = "cpu") -> Resumed | None:
    """Hand the newest readable snapshot's state to `load_state` and cut the run's logs back to its kimg; None when
    the run has no snapshot yet (a fresh start)."""
    loaded = load_newest(run, map_location)
    if loaded is None:
        return None
    load_state(loaded.state)
    dropped = run.truncate_after(float(loaded.state["nimg"]) / 1000)
    return Resumed(loaded.checkpoint, loaded.skipped, dropped)
