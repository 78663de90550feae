"""The state of a run in training: what a snapshot holds, how it is built from the config and how it is saved and
restored. train_step.py changes it one step at a time; train_loop.py decides when to tick, snapshot and score.

Random streams (common random numbers): every purpose draws from its own generator, seeded from (run seed,
purpose): data flips, timesteps, noise (the assigner's candidates), label dropout, and dropout (torch's global
generators, reseeded after the weights are initialised from the run seed). The data order is a seeded permutation
per epoch. So two runs with the same seed and different assigners train on the same images in the same order, with
the same flips, timesteps and dropout masks; only the noise differs, which makes their FID difference far less
noisy than two independent runs. Every stream's state, the data position, the optimizer and both networks are in
each snapshot (`state_dict`), so a resumed run on the CPU is bit-identical to an uninterrupted one; `load_state_dict`
restores one from this device type or another (checkpoint_devices.py). Several processes (train_ranks.py): each
rank keeps its rows of every global batch (`shard`) and has its own dropout stream.
"""

from __future__ import annotations

import copy
import functools
import hashlib

import torch

from . import assigners, checkpoint, checkpoint_devices, distributed, pairing, runs, start_noise, train_batches
from . import train_ranks
from .assigners.meter import PairingMeter
from .assigners.shard import Shard
from .config import Config
from .data import BatchStream, ImageSet, fits_on_gpu, mean_image, tensor_digest
from .networks import build_network
from .train_batches import PairedBatches

STREAMS = ("flips", "timesteps", "noise", "labels")  # one generator each, on the training device


def stream_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose's random stream, derived from the run seed (sha256 of "seed:purpose")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "big") >> 1


class TrainState:
    """The networks (net and its EMA), the optimizer, the random streams, the data position, the paired batches,
    the noise moments and the counters (step, nimg, train_s) of a run in training, and how this device runs them
    (precision, CUDA graphs, memory layout); `state_dict` / `load_state_dict` are a snapshot's contents."""

    def __init__(self, cfg: Config, run: runs.Run, data: ImageSet, device: torch.device):
        self.cfg, self.run, self.device = cfg, run, device
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
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
        self.graphs = t.cuda_graphs and device.type == "cuda"
        if t.cuda_graphs and not self.graphs:
            self.notes.append(f"train.cuda_graphs ignored on {device.type} (CUDA only)")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # static shapes: each conv's fastest algorithm, chosen once
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
        self.step, self.nimg, self.train_s, self.tick_step = 0, 0, 0.0, 0
        self.saved_world = self.world  # processes that wrote the snapshot resumed from

    def data_mean(self, data: ImageSet) -> torch.Tensor | None:
        """The training set's mean image in the scaled model space, on the device, when the rule scores against it
        (assigners.center_for); its digest goes to log.txt and meta.json. The same bits on every rank."""
        mean = assigners.center_for(self.cfg.assigner, lambda: mean_image(data, self.cfg.data.hflip))  # [C, H, W]
        if mean is None:
            return None
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

    # --- a snapshot's contents -----------------------------------------------------------------------------------
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
        checkpoint_devices.restore_random_streams for what is exact and what is reseeded; `notes` says which."""
        self.batches.discard()
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(checkpoint_devices.portable_optimizer_state(state["optimizer"], self.optimizer))
        rng = state["rng"]
        if not all(name in rng for name in STREAMS):
            raise checkpoint.CheckpointError(f"{self.run.path}: this checkpoint has one random stream (immiscible "
                                             f"0.1); finish the run with 0.1 or start it again")
        self.stream.load_state_dict(state["data"])
        self.step, self.nimg, self.train_s = int(state["step"]), int(state["nimg"]), float(state["train_s"])
        self.restore_moments(state.get("noise_moments"))
        self.notes += checkpoint_devices.restore_random_streams(
            rng, self.generators, self.device,
            reseed=lambda name: stream_seed(self.cfg.seed, f"{name}:step{self.step}"))
        if checkpoint_devices.rng_device(rng) == self.device.type:
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

