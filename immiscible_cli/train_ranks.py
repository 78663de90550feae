"""What the training loop does differently on several processes (torchrun; distributed.py): the batch split, the
DDP wrapper, each rank's dropout stream in snapshots and its restoring on a resume (checkpoint.resume is the one
resume path of one process and several), the reduced tick row, and a silent reporter.

The sharding rule (assigners/shard.py): every rank draws the random numbers of the whole global batch from the
run's streams (data order, flips, timesteps, noise, label dropout: the same seeds on every rank) and keeps rows
[r b, (r + 1) b), b = train.batch_size / W. So W processes take the same steps as one process with the same global
batch (up to the order in which gradients are summed), and a run resumed on another number of processes trains on
the same images, timesteps and noise. Only dropout (torch's generator) is drawn per rank, from (seed, rank): rank 0
uses the one-process stream. Snapshots hold every rank's dropout state; a resume on the same number of processes
restores each rank's own (bit-exact on the CPU), on another number reseeds them and says so.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from . import distributed, runs
from .config import Config
from .console import Bars
from .errors import UserError
from .files import write_atomic
from .train_report import Reporter


def split_batch(cfg: Config, world: int) -> tuple[int, int]:
    """(images per rank, images per forward/backward pass) for `world` processes; UserError when the batch does not
    split."""
    batch = cfg.train.batch_size
    if world > batch:
        raise distributed.everywhere(UserError(
            f"train.batch_size: a batch of {batch} cannot be shared by {world} processes; use a batch of at least "
            f"{world} (a multiple of {world}) or fewer processes"))
    if batch % world:
        lower, upper = batch // world * world, (batch // world + 1) * world
        raise distributed.everywhere(UserError(
            f"train.batch_size: {batch} is not divisible by the {world} processes; use a multiple of {world} "
            f"(e.g. {lower} or {upper})"))
    share = batch // world
    micro = min(cfg.train.batch_gpu or share, share)
    if share % micro:
        raise distributed.everywhere(UserError(
            f"train.batch_gpu: {micro} does not divide the {share} images each of the {world} process(es) gets "
            f"(train.batch_size {batch} / {world}); use a divisor of {share}"))
    return share, micro


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `net` when several processes run (gradients averaged over the ranks)."""
    if not distributed.active():
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


def scope(cfg: Config) -> str:
    """How the noise is assigned across processes: linear's `assigner.scope`, else per image."""
    return getattr(cfg.assigner, "scope", None) or "per-image"


def record_processes(run: runs.Run, cfg: Config, world: int) -> runs.Run:
    """Add the number of processes and the assignment scope to a new run's meta.json (rank 0)."""
    meta = {**run.meta(), "world_size": world, "assign_scope": scope(cfg)}
    write_atomic(run.path / runs.META, (json.dumps(meta, indent=2) + "\n").encode())
    return run


# ------------------------------------------------------------------------------------------------------------------
# random state of every rank


def rank_states(device: torch.device) -> dict[str, Any]:
    """Every rank's dropout generator state, gathered (a collective: every rank calls it): `torch_ranks` [W] and, on
    CUDA, `cuda_ranks` [W] (each rank's own GPU)."""
    states = {"torch_ranks": distributed.all_gather_object(torch.get_rng_state())}
    if device.type == "cuda":
        states["cuda_ranks"] = distributed.all_gather_object(torch.cuda.get_rng_state(device).cpu())
    return states


def restore_dropout(state: dict, device: torch.device, seed_of_rank: int) -> int:
    """Restore this rank's dropout state from a snapshot of a multi-process run; the number of processes that wrote
    it. When that differs from now, the stream is reseeded from `seed_of_rank` instead (not bit-exact)."""
    saved = int(state.get("world_size", 1))
    rank, world = distributed.rank(), distributed.world()
    rng = state["rng"]
    if saved != world:
        torch.manual_seed(seed_of_rank)
    elif world > 1:
        torch.set_rng_state(rng["torch_ranks"][rank].cpu())
        if device.type == "cuda" and rng.get("cuda_ranks"):
            torch.cuda.set_rng_state(rng["cuda_ranks"][rank].cpu(), device)
    return saved


def resumed_note(saved: int) -> str | None:
    """The line a resume on another number of processes prints; None on the same number."""
    world = distributed.world()
    if saved == world:
        return None
    return (f"resumed on {world} process{'es' if world > 1 else ''} from a run saved on {saved}: not bit-exact "
            f"(dropout streams reseeded)")


# ------------------------------------------------------------------------------------------------------------------
# tick


def reduce_tick(loss: float, pairing: dict[str, float], peak_mib: float,
                device: torch.device) -> tuple[float, dict[str, float], float]:
    """Mean loss and pairing diagnostics over the ranks, and the largest peak memory (one process: unchanged)."""
    if not distributed.active():
        return loss, pairing, peak_mib
    keys = sorted(pairing)
    values = torch.tensor([loss, *(pairing[k] for k in keys)], dtype=torch.float64, device=device)
    distributed.all_reduce(values, "mean")
    peak = distributed.all_reduce(torch.tensor([peak_mib], dtype=torch.float64, device=device), "max")
    loss, *rest = values.tolist()
    return loss, dict(zip(keys, rest)), float(peak)


def first_bad_step(local: torch.Tensor) -> int:
    """The first step with a non-finite loss on any rank (-1: none); local is this rank's (-1: none)."""
    if not distributed.active():
        return int(local)
    none = torch.iinfo(torch.long).max
    value = torch.where(local < 0, torch.full_like(local, none), local).reshape(1)
    distributed.all_reduce(value, "min")
    return -1 if int(value) == none else int(value)


class SilentReporter(Reporter):
    """The reporter of ranks other than 0: no log lines, no console, no bars."""

    def __init__(self, run: runs.Run, cfg: Config):  # no Reporter.__init__: it would make a console
        self.run, self.cfg, self.console, self.bars = run, cfg, None, Bars(None)

    def __enter__(self) -> "SilentReporter":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def tick(self, row: dict[str, Any]) -> None:
        pass

    def advance(self, nimg: int) -> None:
        pass
