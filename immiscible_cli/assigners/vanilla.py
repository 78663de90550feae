"""Vanilla pairing (noise ~ N(0, I), independent of x0), plus the pieces every pairing rule builds on.

This module owns three things the other rules share, so that they stay comparable bit for bit:
- image scaling (improved paper): the data are multiplied by c = `image_scale` *before* any pairing;
- the vanilla draw: one `randn` call shaped like the batch. Linear assignment permutes exactly this draw, and KNN
  uses it as candidate 0, so with k = 1 KNN is vanilla;
- the `stats` dict a rule fills when asked (`pair_dist`, `random_dist`, `noise_sqnorm`; see `record_stats`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from immiscible_cli.assigners.rule import Rule
from immiscible_cli.assigners.shard import Shard
from immiscible_cli.config import VanillaAssigner


def scale_images(x0: Tensor, image_scale: float) -> Tensor:
    """x0 * c (improved paper, image scaling); x0 itself, not a copy, when c = 1."""
    return x0 if image_scale == 1.0 else x0 * image_scale


def draw_noise(like: Tensor, generator: torch.Generator) -> Tensor:
    """The vanilla draw: N(0, I) shaped like the batch, in its dtype and on its device, in one randn call."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def record_stats(stats: dict[str, Tensor], pair_dist: Tensor, random_dist: Tensor, noise_sqnorm: Tensor) -> None:
    """Write the batch means of per-image [B] values into `stats` as 0-dim float32 tensors on the batch's device.

    pair_dist: |x0_i - noise_i| of the chosen pairing; random_dist: the same for the random pairing of the same
    batch; noise_sqnorm: |noise_i|^2 / D of the chosen noise. No host synchronisation happens here.
    """
    stats["pair_dist"] = pair_dist.float().mean()
    stats["random_dist"] = random_dist.float().mean()
    stats["noise_sqnorm"] = noise_sqnorm.float().mean()


def record_unpaired_stats(stats: dict[str, Tensor], x0: Tensor, noise: Tensor) -> None:
    """Stats of a batch whose noise was not chosen (vanilla, KNN with k = 1, linear with B = 1): pair = random."""
    with torch.no_grad():
        flat_noise = noise.flatten(1).float()  # [B, D]
        dist = torch.linalg.vector_norm(x0.flatten(1).float() - flat_noise, dim=1)  # [B]
        sqnorm = flat_noise.square().mean(dim=1)  # [B]
    record_stats(stats, dist, dist, sqnorm)


def pair(x0: Tensor, cfg: VanillaAssigner, generator: torch.Generator, stats: dict[str, Tensor] | None = None,
         center: Tensor | None = None, shard: Shard | None = None) -> tuple[Tensor, Tensor]:
    """Vanilla rule: (x0 * c, noise ~ N(0, I)) with the noise drawn independently of the images.

    Args:
        x0: clean batch [B, C, H, W] in model space.
        cfg: the assigner config (only `image_scale` is used).
        generator: source of every random draw, on x0's device.
        stats: when a dict, receives `pair_dist`, `random_dist` (equal here) and `noise_sqnorm`.
        shard: several processes: x0 is this process's rows of the global batch, the noise its rows of the global
            draw (assigners/shard.py).
    Returns:
        (x0_paired, noise), both shaped, typed and placed like x0.
    """
    x0_paired = scale_images(x0, cfg.image_scale)
    noise = draw_noise(x0_paired, generator) if shard is None else shard.draw(x0_paired, generator)[1]  # [B, C, H, W]
    if stats is not None:
        record_unpaired_stats(stats, x0_paired, noise)
    return x0_paired, noise


RULE = Rule(pair)
