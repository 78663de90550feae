"""PairingMeter: the trainer's view of the assigner; times every `pair` call and averages its stats per tick.

Nothing here synchronises the host with the device during training: stats stay device tensors and are summed on
the device, and on CUDA the timing is a pair of events recorded around the call and read only in `summary`, the one
sync per tick. On the CPU every op is synchronous, so wall-clock time around the call is the cost.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from immiscible_cli.assigners import AssignerConfig, PairFn, pair

STAT_KEYS = ("pair_dist", "random_dist", "noise_sqnorm")


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

    def pair(self, x0: Tensor, cfg: AssignerConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`assigners.pair(x0, cfg, generator)`, timed, with its stats kept for the next summary."""
        stats: dict[str, Tensor] = {}
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = self.pair_fn(x0, cfg, generator, stats)
            end.record(stream)
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            out = self.pair_fn(x0, cfg, generator, stats)
            self._cpu_seconds += time.perf_counter() - began
        values = torch.stack([stats[key] for key in STAT_KEYS])  # [3]
        self._sums = values if self._sums is None else self._sums.add_(values)
        self._calls += 1
        return out

    def summary(self) -> dict[str, float]:
        """Means since the last summary (then reset): assign_ms, pair_dist, pair_dist_reduction, noise_sqnorm.

        pair_dist_reduction = (random_dist - pair_dist) / random_dist, the papers' distance-reduction diagnostic
        (0 for vanilla). An empty meter gives {}. This is the one host sync.
        """
        if self._calls == 0:
            return {}
        pair_dist, random_dist, noise_sqnorm = (value / self._calls for value in self._sums.tolist())
        if self._cuda:
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
