"""When a run in training ticks, snapshots and scores: `TrainingLoop.run_loop` drives the steps (train_step.py) to
train.total_kimg and, on multiples of their intervals in images, writes a tick's row to metrics.jsonl and log.txt, a
snapshot (checkpoint.py) with its sample grid, and an FID point (the scorer the command built) to fid.jsonl.

Every stop is a tick, so train_s excludes exactly the time spent in snapshots and FID points; the non-finite check
and the reductions over processes happen there, not in the step. A snapshot whose grid is the first images of the
FID point that falls on it (`Scorer.shares_grid`) takes them from the point instead of sampling twice. Rank 0 alone
writes the run directory (distributed.on_main); every rank takes part in the collectives.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import checkpoint, distributed, runs, train_ranks
from .config import Config
from .data import ImageSet
from .errors import EXIT_NON_FINITE, UserError, lowers_on_oom
from .generation import generate
from .images import grid_image, save_png
from .train_report import Reporter
from .train_step import TrainStep


class Scorer(Protocol):
    """What the loop needs of a metric (metrics.scorer.FIDScorer is one): a row for the EMA network now, keeping
    its first `keep` images in `kept` where `shares_grid` says they are the snapshot grid's."""

    kept: torch.Tensor | None

    def score(self, net: torch.nn.Module, *, kimg: float, step: int, train_s: float,
              progress: Callable[[int, int, str], None] | None = None, keep: int = 0) -> dict[str, Any]: ...

    def shares_grid(self, sample: Any) -> bool: ...


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = EXIT_NON_FINITE


class TrainingLoop(TrainStep):
    """A run in training (its state and step: train_state.py, train_step.py) and its schedule; `run_loop()` drives
    it to cfg.train.total_kimg."""

    def __init__(self, cfg: Config, run: runs.Run, data: ImageSet, device: torch.device, scorer: Scorer | None = None,
                 fid_sink: Callable[[dict], None] | None = None):
        self.scorer = scorer
        self.fid_sink = fid_sink or (lambda row: None)
        super().__init__(cfg, run, data, device)

    # --- snapshots -----------------------------------------------------------------------------------------------
    def snapshot(self, grid: bool = True) -> Path:
        """Write a checkpoint and, unless `grid` is False (the FID point that follows draws it: fid_point), its
        sample grid."""
        kimg = self.nimg / 1000
        path = checkpoint.path_for(self.run, kimg)
        state = self.state_dict()  # on every rank; rank 0 alone writes
        distributed.on_main(lambda: self.write_snapshot(path, state, kimg, grid))
        return path

    def write_snapshot(self, path: Path, state: dict, kimg: float, grid: bool = True) -> None:
        checkpoint.save(path, state)
        if grid:
            self.draw_grid(kimg)
        checkpoint.prune(self.run, self.cfg.train.keep_last, self.cfg.train.keep_every_kimg,
                         self.cfg.train.batch_size)

    @lowers_on_oom("sample.batch_size", "while drawing the snapshot grid")
    def draw_grid(self, kimg: float) -> None:
        """The snapshot grid: sample.grid_size images of seeds 0, 1, ... from the EMA network."""
        images = generate(self.ema, self.cfg, list(range(self.cfg.sample.grid_size)),
                          sampler=self.cfg.sample.sampler, steps=self.cfg.sample.steps,
                          guidance=self.cfg.sample.guidance, batch=self.cfg.sample.batch_size, device=self.device)
        save_png(grid_image(images), self.run.grid_path(kimg))

    # --- the loop ------------------------------------------------------------------------------------------------
    def run_loop(self, reporter: Reporter, scored_kimg: frozenset[float] = frozenset()) -> None:
        """Train to total_kimg. Ticks, snapshots and FID points fall on multiples of their intervals (in images);
        the end of training is always a tick and a snapshot. Every stop is a tick, so train_s excludes exactly the
        time spent in snapshots and FID. A run resumed from a snapshot whose FID point is missing from
        `scored_kimg` (the process died while scoring it) scores it first."""
        t = self.cfg.train
        total = round(t.total_kimg * 1000)
        interval = {"tick": round(t.tick_kimg * 1000), "snapshot": round(t.snapshot_kimg * 1000),
                    "fid": round(self.cfg.eval.every_kimg * 1000) if self.scorer is not None else 0}

        def crossed(name: str, before: int) -> bool:
            n = interval[name]
            return n > 0 and self.nimg // n > before // n

        every, batch = interval["fid"], self.cfg.train.batch_size
        owed = every > 0 and self.nimg > 0 and self.nimg // every > (self.nimg - batch) // every  # last step crossed
        owed = owed and round(self.nimg / 1000, 6) not in scored_kimg
        # A snapshot whose grid was to come from its FID point lost it if the process died while scoring
        grid_lost = self.nimg > 0 and not self.run.grid_path(self.nimg / 1000).exists()
        grid_with_point = owed and grid_lost and self.grid_from_fid()
        self.share_moments()
        if owed:
            self.fid_point(reporter, grid=grid_with_point)
        if grid_lost and not grid_with_point:  # the point is not owed, or no longer shares the grid
            distributed.on_main(lambda: self.draw_grid(self.nimg / 1000))
        tick_start, tick_nimg = time.perf_counter(), self.nimg
        while self.nimg < total:
            before = self.nimg
            self.train_step()
            reporter.advance(self.nimg)
            done = self.nimg >= total
            snapshot, fid = crossed("snapshot", before) or done, crossed("fid", before)
            if not (crossed("tick", before) or snapshot or fid or done):
                continue
            self.sync()
            elapsed = time.perf_counter() - tick_start
            self.train_s += elapsed
            self.check_finite()
            self.log_tick(reporter, (self.nimg - tick_nimg) / max(elapsed, 1e-9), self.step - self.tick_step)
            if snapshot or fid:
                self.share_moments()
            grid_from_fid = fid and self.grid_from_fid()  # the point's first images are the grid: sample once
            if snapshot:
                reporter.note(f"snapshot {self.snapshot(grid=not grid_from_fid).name}")
                if not grid_from_fid:
                    reporter.image(self.run.grid_path(self.nimg / 1000), self.nimg)
            if fid:
                self.fid_point(reporter, grid=snapshot and grid_from_fid)
            tick_start, tick_nimg = time.perf_counter(), self.nimg
        if t.keep_network:  # also when a resume finds the training done: the last run may have died before it
            self.keep_network()

    def grid_from_fid(self) -> bool:
        """Whether an FID point at a snapshot draws its grid (the same images: FIDScorer.shares_grid)."""
        return self.scorer is not None and self.scorer.shares_grid(self.cfg.sample)

    @lowers_on_oom("eval.batch_size", "while scoring FID")
    def fid_point(self, reporter: Reporter, grid: bool = False) -> None:
        """Score the EMA network; with `grid`, also write this snapshot's grid from the point's first images."""
        kimg = self.nimg / 1000
        row = self.scorer.score(self.ema, kimg=kimg, step=self.step, train_s=self.train_s,
                                progress=reporter.bars, keep=self.cfg.sample.grid_size if grid else 0)
        if grid:
            distributed.on_main(lambda: save_png(grid_image(self.scorer.kept), self.run.grid_path(kimg)))
            reporter.image(self.run.grid_path(kimg), self.nimg)
        self.fid_sink(row)
        reporter.fid(row)
        reporter.note(f"FID {row['fid']:.3f} at {self.nimg / 1000:g} kimg ({row['num_images']} images, "
                      f"{row['seconds']:.0f} s)")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check_finite(self) -> None:
        bad = train_ranks.first_bad_step(self.first_bad_step)  # over every rank
        if bad >= 0:
            kept = checkpoint.list_checkpoints(self.run)
            where = f"the last good checkpoint is {kept[-1].path.name}" if kept else "no checkpoint was written"
            raise distributed.everywhere(TrainingDiverged(
                f"loss is not finite at step {bad} ({self.run.path}); {where}. Lower train.lr, raise "
                f"train.warmup_kimg or check the data, then resume or start again"))

    def log_tick(self, reporter: Reporter, img_per_s: float, steps: int) -> None:
        """The tick's row (rank 0 writes it): loss and pairing diagnostics averaged over the ranks, img/s of all."""
        loss, pairing, peak = train_ranks.reduce_tick(float(self.loss_sum) / max(steps, 1), self.meter.summary(),
                                                      peak_memory_mib(self.device), self.device)
        row = {"kimg": round(self.nimg / 1000, 6), "step": self.step, "loss": loss, "lr": self.lr_at(self.nimg),
               "img_per_s": img_per_s, **pairing, "train_s": self.train_s, "peak_mem_mib": peak,
               "world_size": self.world, "time": time.time()}
        self.loss_sum.zero_()
        self.tick_step = self.step
        distributed.on_main(lambda: (self.run.append_metrics(row), reporter.tick(row)) and None)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
