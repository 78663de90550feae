"""Each training step's paired batch (x0', labels, noise): drawn when the step asks for it, or, for linear
assignment, one step ahead on a worker thread, so that its host-side solve overlaps the step before it.

The random draws are those of the serial path. The worker draws the next batch's order and flips (the `flips`
stream, data.BatchStream) and its noise (the `noise` stream, the assigner), nothing else; the step itself draws
timesteps, label dropout and dropout from their own streams on the training thread. Every stream is used by one
thread at a time and in the same order as without the worker, so the numbers are bit-identical (a test trains both
ways). A snapshot taken while the next batch is being drawn records the `flips`/`noise` states and the data position
from before that draw (`state_before`), so a resumed run draws that batch again: exact resume still holds.

On CUDA the worker runs on a stream of its own: its host sync (linear's cost matrix to the CPU) then waits for its
own few kernels only, never for the step queued on the training stream. The training stream waits for the worker's
stream before it uses the batch, and the batch's memory is marked as in use there (`record_stream`).
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import Tensor

from .assigners import AssignerConfig, waits_for_host
from .assigners.meter import Measurement, PairingMeter
from .config import Config
from .data import BatchStream

Drawn = tuple[Tensor, Tensor, Tensor, Measurement]  # x0' [b, C, H, W], labels [b], noise [b, C, H, W], its timing


def ahead_of_step(cfg: Config, world: int) -> bool:
    """Whether pairing runs one step ahead: a rule that waits for the host (linear assignment) on one process.
    With several, linear's `global` scope gathers images through collectives, which must not run beside DDP's."""
    return waits_for_host(cfg.assigner) and world == 1


class _Worker(threading.Thread):
    """One call of `work` on its own thread; `result()` joins it and returns its value or raises its error."""

    def __init__(self, work: Callable[[], Drawn]):
        super().__init__(name="immiscible-pairing", daemon=True)
        self.work, self.value, self.error = work, None, None

    def run(self) -> None:
        try:
            self.value = self.work()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self.error = e

    def result(self) -> Drawn:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


class PairedBatches:
    """The batches of the steps, in order: `next()` gives this step's; with `ahead`, the next one is drawn on a
    worker thread meanwhile. Every pairing call is counted by `meter` when its batch is used."""

    def __init__(self, stream: BatchStream, meter: PairingMeter, assigner: AssignerConfig,
                 generators: dict[str, torch.Generator], device: torch.device, ahead: bool):
        self.stream, self.meter, self.assigner, self.generators = stream, meter, assigner, generators
        self.device, self.ahead = device, ahead
        self._pending: _Worker | None = None
        self._before: dict[str, Any] | None = None  # stream states from before the pending draw
        self._side = torch.cuda.Stream(device) if ahead and device.type == "cuda" else None

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        """(x0' [b, C, H, W], labels [b], noise [b, C, H, W]) of this step, paired before its timesteps are drawn."""
        x0, labels, noise, measured = self._draw() if self._pending is None else self._take()
        self.meter.add(measured)
        if self.ahead:
            self._start()
        return x0, labels, noise

    def state_before(self) -> dict[str, Any] | None:
        """While the next batch is being drawn: the `flips` and `noise` generator states and the data position from
        before its draw (what a snapshot must hold); None when nothing is drawn ahead."""
        return self._before

    def discard(self) -> None:
        """Wait for a batch drawn ahead and drop it (before the streams are set from a snapshot)."""
        if self._pending is not None:
            self._pending.join()
        self._pending = self._before = None

    def _draw(self) -> Drawn:
        x0, labels = self.stream.next(self.generators["flips"])  # [b, C, H, W], [b]
        (x0, noise), measured = self.meter.measure(x0, self.assigner, self.generators["noise"])
        return x0, labels, noise, measured

    def _start(self) -> None:
        self._before = {"flips": self.generators["flips"].get_state(),
                        "noise": self.generators["noise"].get_state(), "data": self.stream.state_dict()}
        threads = torch.get_num_threads()  # a new thread would start with the default count (and reduce differently)

        def work() -> Drawn:
            torch.set_num_threads(threads)
            with torch.cuda.stream(self._side) if self._side is not None else nullcontext():
                return self._draw()

        self._pending = _Worker(work)
        self._pending.start()

    def _take(self) -> Drawn:
        x0, labels, noise, measured = self._pending.result()
        self._pending = self._before = None
        if self._side is not None:
            training = torch.cuda.current_stream(self.device)
            training.wait_stream(self._side)
            for tensor in (x0, labels, noise, measured.values):
                tensor.record_stream(training)
        return x0, labels, noise, measured
