"""Checkpoint contents: what a snapshot holds, how it is written (atomically) and read (weights_only, with fallback).

A snapshot is one `torch.save`d dict of tensors and plain values, so `torch.load(weights_only=True)` reads it:
    format, kimg, nimg, step, train_s, config (the resolved config as a dict), config_digest,
    net, ema (state_dicts), optimizer (state_dict),
    rng {"train": generator state, "torch": CPU state, "cuda": [per-device states]}, data {"epoch", "position"}.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .runs import Checkpoint, Run, write_atomic

FORMAT = "immiscible-snapshot-v1"


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
    for ckpt in reversed(run.checkpoints()):
        try:
            return Loaded(ckpt, load(ckpt.path, map_location), skipped)
        except CheckpointError as e:
            skipped.append(str(e))
    if skipped:
        raise CheckpointError(f"{run.path}: no readable checkpoint ({len(skipped)} unreadable: {skipped[0]})")
    return None


def select(run: Run, spec: str) -> Checkpoint:
    """`latest` or a kimg (the snapshot nearest to it, within 0.5 kimg) -> a checkpoint of the run."""
    available = run.checkpoints()
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


def prune(run: Run, keep_last: int, keep_every_kimg: float) -> list[Path]:
    """Delete snapshots beyond the newest `keep_last`, except those at multiples of keep_every_kimg."""
    removed = []
    available = run.checkpoints()
    for ckpt in available[:-keep_last] if keep_last < len(available) else []:
        if keep_every_kimg > 0:
            ratio = ckpt.kimg / keep_every_kimg
            if abs(ratio - round(ratio)) < 1e-6:
                continue
        ckpt.path.unlink(missing_ok=True)
        removed.append(ckpt.path)
    return removed
