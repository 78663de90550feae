"""PairingMeter: the trainer's view of the assigner; times every `pair` call and averages its stats per tick.

Nothing here synchronises the host with the device during training: stats stay device tensors and are summed on
the device, and on CUDA the timing is a pair of events recorded around the call (on the stream the call runs on)
and read only in `summary`, the one sync per tick. On the CPU every op is synchronous, so wall-clock time around
the call is the cost.

A call can be measured on one thread and counted on another: `measure` touches no state of the meter (the trainer
runs linear assignment one step ahead on a worker thread: train_batches.py), `add` counts a measurement when its
batch is used, so a tick's averages cover exactly the batches trained on in that tick. `assign_ms` is then still the
pairing's own time (worker thread, or its CUDA stream), most of it hidden behind the previous step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from immiscible_cli.assigners import AssignerConfig, PairFn, pair

STAT_KEYS = ("pair_dist", "random_dist", "noise_sqnorm")


@dataclass
class Measurement:
    """One pairing call: its stats [3] (STAT_KEYS order, on the device) and its time (CUDA events or seconds)."""

    values: Tensor
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
    cpu_seconds: float = 0.0


class PairingMeter:
    """Calls `pair` with a stats dict, timing it, and accumulates per-call stats until `summary`."""

    def __init__(self, device: torch.device | str, pair_fn: PairFn = pair):
        """`pair_fn`: the pairing called (assigners.pair, or a process's share of it: assigners/shard.py)."""
        self.device, self.pair_fn = torch.device(device), pair_fn
        self._cuda = self.device.type == "cuda"
        self._reset()

    def _reset(self) -> None:
        self._calls = 0
        self._sums: Tensor | None = None  # [3] on the device, in STAT_KEYS order
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu_seconds = 0.0

    def measure(self, x0: Tensor, cfg: AssignerConfig,
                generator: torch.Generator) -> tuple[tuple[Tensor, Tensor], Measurement]:
        """`pair_fn(x0, cfg, generator)` and its Measurement; safe on any thread (the meter is not touched). On
        CUDA the events are recorded on the calling thread's current stream."""
        stats: dict[str, Tensor] = {}
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = self.pair_fn(x0, cfg, generator, stats)
            end.record(stream)
            measured = Measurement(torch.stack([stats[key] for key in STAT_KEYS]), events=(start, end))  # [3]
        else:
            began = time.perf_counter()
            out = self.pair_fn(x0, cfg, generator, stats)
            measured = Measurement(torch.stack([stats[key] for key in STAT_KEYS]),  # [3]
                                   cpu_seconds=time.perf_counter() - began)
        return out, measured

    def add(self, measured: Measurement) -> None:
        """Count one measured call (on the thread that trains: the stats are summed on its stream)."""
        self._sums = measured.values if self._sums is None else self._sums.add_(measured.values)
        if measured.events is not None:
            self._events.append(measured.events)
        self._cpu_seconds += measured.cpu_seconds
        self._calls += 1

    def pair(self, x0: Tensor, cfg: AssignerConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`assigners.pair(x0, cfg, generator)`, timed, with its stats kept for the next summary."""
        out, measured = self.measure(x0, cfg, generator)
        self.add(measured)
        return out

    def summary(self) -> dict[str, float]:
        """Means since the last summary (then reset): assign_ms, pair_dist, pair_dist_reduction, noise_sqnorm.

        pair_dist_reduction = (random_dist - pair_dist) / random_dist, the papers' distance-reduction diagnostic
        (0 for vanilla). An empty meter gives {}. This is the one host sync.
        """
        if self._calls == 0:
            return {}
        pair_dist, random_dist, noise_sqnorm = (value / self._calls for value in self._sums.tolist())
        if self._events:
            self._events[-1][1].synchronize()
            total_ms = sum(start.elapsed_time(end) for start, end in self._events)
        else:
            total_ms = self._cpu_seconds * 1e3
        result = {
            "assign_ms": total_ms / self._calls,
            "pair_dist": pair_dist,
            "pair_dist_reduction": (random_dist - pair_dist) / random_dist if random_dist > 0 else 0.0,
            "noise_sqnorm": noise_sqnorm,
        }
        self._reset()
        return result
