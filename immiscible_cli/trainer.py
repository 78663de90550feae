"""The training loop: assigner -> objective -> step, EMA, warm-up, ticks, snapshots, FID points, exact resume.

Data flow of one step: batch x0 -> assigner(x0, generator) -> (x0', noise) -> t = objective.sample_t
-> per-sample loss = objective.loss(net, x0', noise, t) -> mean -> backward -> clip -> Adam -> EMA.

Random streams (common random numbers): every purpose draws from its own generator, seeded from (run seed,
purpose): data flips, timesteps, noise (the assigner's candidates), label dropout, and dropout (torch's global
generators, reseeded after the weights are initialised from the run seed). The data order is a seeded permutation
per epoch. So two runs with the same seed and different assigners train on the same images in the same order, with
the same flips, timesteps and dropout masks; only the noise differs, which makes their FID difference far less
noisy than two independent runs. Every stream's state, the data position, the optimizer and both networks are in
each snapshot, so a resumed run on the CPU is bit-identical to an uninterrupted one.
On CUDA the step has no host synchronisation: loss sums and the non-finite check stay on the device until a tick;
linear assignment's host-side solve runs one step ahead on a worker thread (train_batches.py, bit-identical).
`train.compile` compiles the per-sample loss (network + objective) as one graph; snapshots resume on another device.
Several processes (torchrun) share each global batch by rows and rank 0 alone writes the run: train_ranks.py.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import (assigners, checkpoint, distributed, latents, loggers, pairing, runs, start_noise, train_batches,
               train_ranks, vae)
from .assigners.shard import Shard
from .assigners.meter import PairingMeter
from .config import Config
from .data import BatchStream, ImageSet, check_classes, fits_on_gpu, load_images, mean_image, tensor_digest
from .errors import EXIT_NON_FINITE, UserError, lowers_on_oom
from .images import grid_image, save_png
from .networks import build_network, expected_snapshot, pick_device
from .objectives import build_objective
from .generation import generate
from .train_batches import PairedBatches
from .train_report import Reporter


STREAMS = ("flips", "timesteps", "noise", "labels")  # one generator each, on the training device


def stream_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose's random stream, derived from the run seed (sha256 of "seed:purpose")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "big") >> 1


class Scorer(Protocol):
    """What the loop needs of a metric (metrics.scorer.FIDScorer is one): a row for the EMA network now, keeping
    its first `keep` images in `kept` where `shares_grid` says they are the snapshot grid's."""

    kept: torch.Tensor | None

    def score(self, net: torch.nn.Module, *, kimg: float, step: int, train_s: float,
              progress: Callable[[int, int, str], None] | None = None, keep: int = 0) -> dict[str, Any]: ...

    def shares_grid(self, sample: Any) -> bool: ...


def compile_loss(loss: Callable[..., torch.Tensor], *, cuda_graphs: bool = False, backend: str = "inductor",
                 fullgraph: bool = False) -> Callable[..., torch.Tensor]:
    """`loss` (network + objective) through torch.compile with static shapes (every step has the same batch
    shape); with `cuda_graphs`, mode `reduce-overhead`, which replays it as CUDA graphs. `backend`/`fullgraph`
    for tests (e.g. "aot_eager" on the CPU checks that the whole loss traces as one graph)."""
    return torch.compile(loss, dynamic=False, backend=backend, fullgraph=fullgraph,
                         mode="reduce-overhead" if cuda_graphs else None)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = EXIT_NON_FINITE


class TrainingLoop:
    """State and one step of training; `run_loop()` drives it to cfg.train.total_kimg."""

    def __init__(self, cfg: Config, run: runs.Run, data: ImageSet, device: torch.device, scorer: Scorer | None = None,
                 fid_sink: Callable[[dict], None] | None = None):
        self.cfg, self.run, self.device, self.scorer = cfg, run, device, scorer
        self.fid_sink = fid_sink or (lambda row: None)
        t = cfg.train
        # Several processes (train_ranks.py): this rank's rows of every global batch, micro-batches of `micro`.
        self.rank, self.world, self.batch = distributed.rank(), distributed.world(), t.batch_size
        self.share, self.micro = train_ranks.split_batch(cfg, self.world)
        self.shard = Shard(self.rank, self.world, self.batch) if self.world > 1 else None
        self.notes: list[str] = []  # for log.txt: settings ignored here, how a resume restored the random streams
        torch.manual_seed(cfg.seed)  # weights init from the run seed ...
        self.net = build_network(cfg).to(device).train()
        self.channels_last = t.channels_last
        if self.channels_last:  # before the EMA copy, so both keep one layout and the EMA update stays one kernel
            self.net.to(memory_format=torch.channels_last)
        torch.manual_seed(self.dropout_seed())  # ... then dropout draws from its own stream
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.ddp = train_ranks.wrap(self.net, device)  # the network itself in one process
        self.forward = self.ddp
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
        self.graphs = t.cuda_graphs and device.type == "cuda"
        if t.cuda_graphs and not self.graphs:
            self.notes.append(f"train.cuda_graphs ignored on {device.type} (CUDA only)")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # static shapes: each conv's fastest algorithm, chosen once
        self.batch_loss = (compile_loss(self.per_sample_loss, cuda_graphs=self.graphs) if t.compile or self.graphs
                           else self.per_sample_loss)
        self.objective = build_objective(cfg.objective)
        optimizer = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(self.net.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay,
                                   **({"fused": True} if device.type == "cuda" else {}))
        self.generators = {name: torch.Generator(device).manual_seed(stream_seed(cfg.seed, name))
                           for name in STREAMS}
        resident = cfg.data.gpu_resident and fits_on_gpu(data, device)
        self.stream = BatchStream(data, t.batch_size, device, cfg.seed, cfg.data.hflip, resident,
                                  self.shard.rows if self.shard else None)
        self.center = self.data_mean(data)  # the data mean KNN's `centred` score needs; None for other rules
        # The public API's layer (pairing.py): the trainer is its first user, so API and trainer pair alike.
        self.meter = PairingMeter(device, functools.partial(pairing.pair_config, center=self.center, shard=self.shard))
        shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        self.moments = start_noise.NoiseMoments.zeros(shape, device)  # this process's share since the start
        self.batches = PairedBatches(self.stream, self.meter, cfg.assigner, self.generators, device,
                                     ahead=train_batches.ahead_of_step(cfg, self.world))
        self.params = [p for p in self.net.parameters()]
        self.ema_params = [p for p in self.ema.parameters()]
        halflife = t.ema_halflife_kimg
        self.ema_beta = 0.5 ** (t.batch_size / (halflife * 1000)) if halflife else t.ema_decay
        self.ema_warmup = t.ema_warmup
        self.step, self.nimg, self.train_s, self.tick_step = 0, 0, 0.0, 0
        self.saved_world = self.world  # processes that wrote the snapshot resumed from
        self.loss_sum = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def data_mean(self, data: ImageSet) -> torch.Tensor | None:
        """The training set's mean image in the scaled model space, on the device, when the rule scores against it
        (assigners.needs_center); its digest goes to log.txt and meta.json. The same bits on every rank."""
        if not assigners.needs_center(self.cfg.assigner):
            return None
        mean = mean_image(data, self.cfg.data.hflip) * self.cfg.assigner.image_scale  # [C, H, W]
        digest = tensor_digest(mean)
        self.notes.append(f"data mean for knn_score=centred: {len(data)} images, sha256 {digest}")
        distributed.on_main(lambda: self.run.update_meta(data_mean_sha256=digest))
        return mean.to(self.device)

    def global_moments(self) -> start_noise.NoiseMoments:
        """The training noise's moments over every process (a collective with several)."""
        if self.world == 1:
            return self.moments
        total = distributed.all_reduce(self.moments.total.clone())
        sqtotal = distributed.all_reduce(self.moments.sqtotal.clone())
        count = distributed.all_reduce(torch.tensor(self.moments.count, dtype=torch.float64, device=self.device))
        return start_noise.NoiseMoments(total, sqtotal, round(float(count)))

    def share_moments(self) -> None:
        """Let the EMA network carry the noise moments so far, for the grids and FID points that follow (a
        collective with several processes: every rank calls it)."""
        start_noise.attach(self.ema, self.global_moments())

    def dropout_seed(self, resumed_at: int | None = None) -> int:
        """Rank 0: the run's dropout stream (one process's); rank r: its own, from (seed, r); reseeded at a step
        when resumed on another number of processes."""
        purpose = "dropout" if self.rank == 0 else f"dropout:rank{self.rank}"
        return stream_seed(self.cfg.seed, purpose if resumed_at is None else f"{purpose}:step{resumed_at}")

    # --- one step ------------------------------------------------------------------------------------------------
    def net_fn(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.forward(x, t, labels).float()

    def per_sample_loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        labels: torch.Tensor | None) -> torch.Tensor:
        """The objective's per-sample loss [b] of the network on paired x0', noise [b, C, H, W] at times t [b]
        (what train.compile compiles: network and objective in one graph)."""
        return self.objective.loss(self.net_fn, x0, noise, t, labels)

    def lr_at(self, nimg: int) -> float:
        warmup = self.cfg.train.warmup_kimg * 1000
        return self.cfg.train.lr * (min(1.0, nimg / warmup) if warmup > 0 else 1.0)

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay of update number `step` (1-based); with warm-up min(decay, (1 + n) / (10 + n)) (tqch)."""
        return min(self.ema_beta, (1 + step) / (10 + step)) if self.ema_warmup else self.ema_beta

    @lowers_on_oom("train.batch_gpu", "in a training step",  # micro-batches: the same step in less memory
                   lambda loop: f"{loop.micro}; a divisor of {loop.share}, the images of a step on each process")
    def train_step(self) -> None:
        cfg, g = self.cfg, self.generators
        rows = self.shard.rows if self.shard else slice(None)  # several processes: draw all B, keep my b rows
        x0, labels, noise = self.batches.next()  # [b, C, H, W], [b], [b, C, H, W]: paired before t is drawn
        self.moments.add(noise)
        t = self.objective.sample_t(self.batch, g["timesteps"], self.device)[rows]  # [b]
        if cfg.model.num_classes is None:
            labels = None
        elif cfg.train.label_dropout > 0:  # classifier-free guidance: the null label is num_classes
            drop = torch.rand((self.batch,), generator=g["labels"], device=self.device)[rows] < cfg.train.label_dropout
            labels = torch.where(drop, torch.full_like(labels, cfg.model.num_classes), labels)
        if self.micro == self.share:
            self.mark_graph_step()
            loss = self.batch_loss(x0, noise, t, labels).mean()  # per-sample -> batch mean
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the ranks
        else:
            loss = self.accumulate(x0, noise, t, labels)
        self.nimg += self.batch
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.nimg)
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip, foreach=True)
        self.optimizer.step()
        self.step += 1
        # The parameters (and so the EMA) stay fp32 under bf16 autocast, which casts op inputs, never parameters.
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema_decay_at(self.step))
        loss = loss.detach()
        self.loss_sum += loss
        bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, self.step), self.first_bad_step)

    def accumulate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   labels: torch.Tensor | None) -> torch.Tensor:
        """Gradients of this rank's batch mean, from micro-batches of train.batch_gpu images (DDP averages them
        over the ranks once, after the last); returns the batch mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total, count = torch.zeros((), device=self.device), x0.shape[0]
        for start in range(0, count, self.micro):
            part = slice(start, start + self.micro)
            last = start + self.micro >= count
            with nullcontext() if last or self.ddp is self.net else self.ddp.no_sync():
                self.mark_graph_step()
                loss = self.batch_loss(x0[part], noise[part], t[part],
                                       None if labels is None else labels[part]).sum() / count
                loss.backward()
            total += loss.detach()
        return total

    def mark_graph_step(self) -> None:
        """With CUDA graphs: a new replay begins (the outputs of the last one may be overwritten from here on)."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()

    # --- snapshots -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The snapshot; with several processes a collective (every rank's dropout state is gathered)."""
        rng = {**{name: g.get_state() for name, g in self.generators.items()}, "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
               "device": self.device.type}
        data = self.stream.state_dict()
        before = self.batches.state_before()
        if before is not None:  # the next batch is being drawn ahead: record the streams as they were before it
            rng.update(flips=before["flips"], noise=before["noise"])
            data = before["data"]
        if self.world > 1:
            rng.update(train_ranks.rank_states(self.device))
        return {
            "kimg": self.nimg / 1000, "nimg": self.nimg, "step": self.step, "train_s": self.train_s,
            "config": self.cfg.to_dict(), "config_digest": self.cfg.digest(),
            "net": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "data": data, "world_size": self.world, "noise_moments": self.global_moments().state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a snapshot, from this device type or another (CUDA <-> CPU, fewer GPUs): see
        checkpoint.restore_random_streams for what is exact and what is reseeded; `notes` says which."""
        self.batches.discard()
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(checkpoint.portable_optimizer_state(state["optimizer"], self.optimizer))
        rng = state["rng"]
        if not all(name in rng for name in STREAMS):
            raise checkpoint.CheckpointError(f"{self.run.path}: this checkpoint has one random stream (immiscible "
                                             f"0.1); finish the run with 0.1 or start it again")
        self.stream.load_state_dict(state["data"])
        self.step, self.nimg, self.train_s = int(state["step"]), int(state["nimg"]), float(state["train_s"])
        self.restore_moments(state.get("noise_moments"))
        self.notes += checkpoint.restore_random_streams(
            rng, self.generators, self.device,
            reseed=lambda name: stream_seed(self.cfg.seed, f"{name}:step{self.step}"))
        if checkpoint.rng_device(rng) == self.device.type:
            self.saved_world = train_ranks.restore_dropout(state, self.device, self.dropout_seed(self.step))
        else:  # dropout reseeded with the streams (another device's generators: nothing to restore)
            torch.manual_seed(self.dropout_seed(self.step))
            self.saved_world = int(state.get("world_size", 1))
        self.tick_step = self.step

    def restore_moments(self, saved) -> None:
        """The noise moments of a snapshot: rank 0 holds the global sums, the others start from zero (their sum
        is what state_dict reduces). A snapshot without them (older versions) restarts them, with a note."""
        moments = start_noise.NoiseMoments.from_state(saved, tuple(self.moments.total.shape), self.device)
        if moments is None:
            self.notes.append("this snapshot holds no noise moments: they count from here (sample.start=matched "
                              "then fits the noise since this resume)")
        elif distributed.is_main():
            self.moments = moments

    def keep_network(self) -> None:
        """RUN/network.pt: the final EMA weights and noise moments (train.keep_network; a collective)."""
        moments = self.global_moments().state()
        distributed.on_main(lambda: checkpoint.save_network(self.run, {
            "kimg": self.nimg / 1000, "nimg": self.nimg, "step": self.step, "train_s": self.train_s,
            "config": self.cfg.to_dict(), "config_digest": self.cfg.digest(), "ema": self.ema.state_dict(),
            "noise_moments": moments}))

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


# ------------------------------------------------------------------------------------------------------------------
# entry point


def check_before_work(cfg: Config) -> None:
    """What fails before any work or write: an optional solver (assigner) or logger extra that is not installed,
    a batch the processes cannot share (train_ranks.split_batch), latents that do not fit the model or a VAE that
    is missing or not theirs (latents.check_training_vae)."""
    assigners.check_available(cfg.assigner)
    loggers.check_available(cfg.train.loggers)
    train_ranks.split_batch(cfg, distributed.world())
    latents.check_training_vae(cfg)


def train(cfg: Config, out_root: Path, run_dir: Path | None = None, resume: bool = False,
          scorer: Scorer | None = None, argv: list[str] | None = None, console=None) -> runs.Run:
    """Train `cfg` into a new numbered run under out_root, or into run_dir: continued when it already holds this
    run (or, with resume=True, that run with the fields RESUMABLE_OVERRIDES allows changed). `scorer`, when given,
    makes an FID point every cfg.eval.every_kimg; its rows go to the run's fid.jsonl."""
    from .runs import append_fid_row, read_fid_rows

    device = pick_device(cfg.train.device)
    check_before_work(cfg)
    data = load_images(cfg.data)  # a missing dataset fails here, before any directory is made
    try:
        check_classes(data, cfg.model.num_classes)  # a conditional model needs a class for every image's label
    except UserError as e:
        raise distributed.everywhere(e) from None
    decoding = latents.training_vae(cfg, device)  # latents: (header, VAE) checked before any directory is made
    continued = run_dir is not None and (resume or runs.holds_run(run_dir))
    run = distributed.on_main(lambda: _open_or_create(cfg, out_root, run_dir, resume, argv, device))
    with distributed.main_context(run.lock):  # several processes: rank 0 alone writes the run directory
        if continued:  # under the lock: a second process refused by it records nothing
            distributed.on_main(lambda: record_continuation(run, argv, str(device)))
        loop = TrainingLoop(cfg, run, data, device, scorer,
                            fid_sink=lambda row: distributed.on_main(lambda: append_fid_row(run, row)))
        if decoding is not None:  # the grids and FID points decode with it; meta.json says which VAE it is
            header, decoder = decoding
            vae.attach(loop.ema, decoder)
            record = {**header.record(), "vae": decoder.identity.record()}
            distributed.on_main(lambda: run.update_meta(latents=record))
        reporter = Reporter(run, cfg, console) if distributed.is_main() else train_ranks.SilentReporter(run, cfg)
        with reporter:
            if loop.world > 1 or loop.micro < loop.share:
                reporter.note(f"{loop.world} process(es) x {loop.share} images per step, {loop.micro} per pass; "
                              f"assignment scope {train_ranks.scope(cfg)}")
            _restore(loop, run, reporter)
            for message in loop.notes:  # settings ignored on this device; random streams a resume could not restore
                reporter.note(message)
            if resume:  # only once the new config has built and restored the loop
                distributed.on_main(lambda: run.config() != cfg and run.write_config(cfg))
            distributed.on_main(lambda: reporter.use(loggers.open_loggers(cfg, run, loop.nimg)))  # rank 0 logs
            scored = distributed.on_main(lambda: frozenset(round(float(r["kimg"]), 6) for r in read_fid_rows(run)))
            loop.run_loop(reporter, scored)
    return run


CONTINUATION_FIELDS = ("argv", "immiscible_version", "torch_version", "git_sha", "git_dirty", "device", "start_time")


def record_continuation(run: runs.Run, argv: list[str] | None, device: str) -> None:
    """meta.json of a run being continued: each continuation appends what ran it (`continued`: argv, versions, git
    commit and dirtiness, device, time), since the code may have changed since the first start; a run whose
    meta.json is missing gets one again (its `start_time` then says when it was rewritten)."""
    from .provenance import provenance

    now = provenance(argv, device)
    if not (run.path / runs.META).exists():
        run.update_meta(**now, meta_rewritten=True)
        return
    earlier = run.meta().get("continued")
    run.update_meta(continued=[*(earlier if isinstance(earlier, list) else []),
                               {key: now.get(key) for key in CONTINUATION_FIELDS}])


def _open_or_create(cfg: Config, out_root: Path, run_dir: Path | None, resume: bool, argv, device) -> runs.Run:
    world = distributed.world()
    if run_dir is None:
        return train_ranks.record_processes(runs.create_run(out_root, cfg, argv, str(device)), cfg, world)
    if resume or runs.holds_run(run_dir):
        run = runs.open_run(run_dir)
        if not resume and run.config().digest() != cfg.digest():
            raise UserError(f"{run_dir}: holds a run with another config; continue it with `immiscible train "
                            f"--resume {run_dir}` or pick a new --run-dir")
        return run
    return train_ranks.record_processes(runs.create_run_at(Path(run_dir), cfg, argv, str(device)), cfg, world)


def _restore(loop: TrainingLoop, run: runs.Run, reporter: Reporter) -> None:
    # we hold the run's lock: no snapshot is being written
    for path in distributed.on_main(lambda: checkpoint.remove_leftovers(run)):
        reporter.note(f"removed {path.name}, left by a write that was killed")
    if distributed.active():
        resumed = train_ranks.resume(loop, run)
    else:
        resumed = checkpoint.resume(run, loop.load_state_dict, map_location=loop.device,
                                    expected=expected_snapshot(loop.cfg))
    if resumed is None:
        return
    for message in resumed.skipped:
        reporter.note(f"skipping {message}")
    reporter.note(f"resumed from {resumed.checkpoint.path.name} (step {loop.step}, {loop.nimg / 1000:g} kimg)"
                  + (f"; dropped {resumed.dropped_rows} log rows written after it" if resumed.dropped_rows else ""))
    note = train_ranks.resumed_note(loop.saved_world)
    if note:
        reporter.note(note)
