"""Noise assigners: one pairing rule per file (vanilla.py, linear.py, knn.py), a registry keyed by `assigner.name`.

Every rule has the same signature, `pair(x0, cfg, generator, stats=None, center=None, shard=None) -> (x0_paired,
noise)`, and registers a `rule.Rule` (its `pair` and its properties) in `ASSIGNERS`:
- `x0` is a clean batch [B, C, H, W] in model space (pixels in [-1, 1], or latents); both results keep its shape,
  device and dtype. `x0_paired = x0 * image_scale` (x0 itself when the scale is 1): image scaling comes first, and
  the pairing works on the scaled data.
- `noise` is what the objective uses both to build x_t and as its regression target. Only noise is chosen or
  permuted: images and labels keep their order. The rule never sees the model or the timestep.
- every random draw comes from `generator` (on x0's device).
- `center` is the training set's mean image [C, H, W] in the scaled model space (data.mean_image x image_scale:
  `center_for(cfg, mean)`, the one place that scales it), for rules that score against it (KNN's `centred` score);
  the others ignore it. `needs_center(cfg)` says which.
- `stats`, when a dict, receives 0-dim float32 tensors on the batch's device, written without host sync (linear
  needs the CPU anyway): `pair_dist` (mean |x0_paired_i - noise_i|), `random_dist` (the same for the random pairing
  of the same batch) and `noise_sqnorm` (mean |noise_i|^2 / D). `meter.PairingMeter` times calls and averages these.
- `shard`, a `shard.Shard`, asks for one process's rows of the global batch (several processes; x0 holds those
  rows): the rule's sharded form, written in its own file.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

from immiscible_cli.assigners import knn, linear, vanilla
from immiscible_cli.assigners.rule import PairFn, Rule
from immiscible_cli.assigners.shard import Shard
from immiscible_cli.config import KNNAssigner, LinearAssigner, VanillaAssigner

AssignerConfig = Union[VanillaAssigner, LinearAssigner, KNNAssigner]

ASSIGNERS: dict[str, Rule] = {"vanilla": vanilla.RULE, "linear": linear.RULE, "knn": knn.RULE}


def pair(x0: Tensor, cfg: AssignerConfig, generator: torch.Generator, stats: dict[str, Tensor] | None = None,
         center: Tensor | None = None, shard: Shard | None = None) -> tuple[Tensor, Tensor]:
    """Pair the clean batch x0 [B, C, H, W] with noise by the rule `cfg.name`; see the module docstring."""
    return ASSIGNERS[cfg.name].pair(x0, cfg, generator, stats, center, shard)


def waits_for_host(cfg: AssignerConfig) -> bool:
    """Whether the rule's pairing waits for the host (a CPU solve): the trainer then draws it a step ahead."""
    return ASSIGNERS[cfg.name].waits_for_host


def needs_center(cfg: AssignerConfig) -> bool:
    """Whether the rule scores against the training set's mean image (then `pair` must be given `center`)."""
    return ASSIGNERS[cfg.name].needs_center(cfg)


def center_for(cfg: AssignerConfig, mean: Tensor | Callable[[], Tensor]) -> Tensor | None:
    """The `center` to pair with: the data's mean image in model space (`mean`, or `mean()`, called only when the
    rule needs it: a training set's mean costs a pass over it) times image_scale, when the rule scores against it
    (needs_center); None for the others. A scale of 1 returns the mean itself (the same bits either way)."""
    if not needs_center(cfg):
        return None
    mean = mean() if callable(mean) else mean
    return mean if cfg.image_scale == 1.0 else mean * cfg.image_scale


def check_available(cfg: AssignerConfig) -> None:
    """Fail early, with one line, when the rule needs an optional package that is not installed."""
    ASSIGNERS[cfg.name].check_available(cfg)


def decode(samples: Tensor, cfg: AssignerConfig) -> Tensor:
    """Generated samples back to data range: divided by `image_scale` (improved paper), clamped to [-1, 1]."""
    return (samples / cfg.image_scale).clamp(-1.0, 1.0)


__all__ = ["ASSIGNERS", "AssignerConfig", "PairFn", "Rule", "Shard", "center_for", "check_available", "decode",
           "needs_center", "pair", "waits_for_host"]
