"""What the trainer knows of a pairing rule: its `pair` function and its properties, one `Rule` per rule file,
registered in `assigners.ASSIGNERS`. Nothing outside a rule's own file and the registries tests its name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

PairFn = Callable[..., tuple[Tensor, Tensor]]  # (x0, cfg, generator, stats, center, shard) -> (x0', noise)


def never(cfg: Any) -> bool:
    return False


def always_available(cfg: Any) -> None:
    return None


@dataclass(frozen=True)
class Rule:
    """A pairing rule.

    pair: `pair(x0, cfg, generator, stats=None, center=None, shard=None) -> (x0', noise)` (the contract is in
        assigners/__init__.py); with a `shard.Shard`, x0 is that process's rows of the global batch and the result
        is those rows of the one-process result (or the rule's documented per-process form).
    waits_for_host: its pairing waits for the host (a CPU solve), so with one process the trainer draws it one step
        ahead on a worker thread (train_batches.py).
    needs_center: whether `pair` must be given the training set's mean image for this config.
    check_available: raises a one-line UserError when the config needs an optional package that is missing.
    """

    pair: PairFn
    waits_for_host: bool = False
    needs_center: Callable[[Any], bool] = never
    check_available: Callable[[Any], None] = always_available
