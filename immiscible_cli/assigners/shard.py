"""Pairing on one process's share of a global batch (several processes: distributed.py).

The sharding rule: every process draws the random numbers of the WHOLE global batch of B images from the run's
streams (the same seeds on every rank) and keeps rows [r b, (r + 1) b) of it, b = B / W for rank r of W. So each
image meets the same noise candidates whatever the world size, and the rules stay those of one process:
- vanilla: the rows of the global vanilla draw;
- knn: every candidate group is drawn for the whole batch (knn.draw_groups of the global B: the same stream) and
  only the shard's rows are scored; knn is per image, so this is exactly the one-process result;
- linear, scope `global` (the official code's choice): the images are gathered, rank 0 solves the assignment of the
  global batch to the global vanilla draw (cost and solver exactly as one process on the concatenated batch) and
  sends the permutation to every rank, which takes the noise of its rows. Rank 0 alone solves, so every rank uses
  the same permutation even where GPUs of different models would round a cost differently;
- linear, scope `local`: each rank assigns its shard to its rows of the global vanilla draw (a b x b problem).
The cost is W times the random draws of one process's batch: negligible beside the network's forward and backward.
`stats` are those of the shard's rows; the trainer averages them over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from immiscible_cli import distributed
from immiscible_cli.assigners import knn, linear
from immiscible_cli.assigners.vanilla import record_stats, record_unpaired_stats, scale_images


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` processes, sharing a global batch of `batch` images (batch % world == 0)."""

    rank: int
    world: int
    batch: int

    @property
    def size(self) -> int:
        return self.batch // self.world

    @property
    def rows(self) -> slice:
        return slice(self.rank * self.size, (self.rank + 1) * self.size)


def pair(x0: Tensor, cfg, generator: torch.Generator, stats: dict[str, Tensor] | None = None,
         center: Tensor | None = None, *, shard: Shard) -> tuple[Tensor, Tensor]:
    """The rule `cfg.name` for the shard x0 [b, C, H, W] (rows `shard.rows` of the global batch); see the module
    docstring. Same contract as `assigners.pair`."""
    x = scale_images(x0, cfg.image_scale)
    if cfg.name == "knn" and cfg.k > 1:
        with torch.no_grad():
            noise, best, first = knn.select_nearest(x, cfg.k, generator, cfg.memory_budget_mib * 2**20,
                                                    draw_batch=shard.batch, shard_rows=shard.rows,
                                                    score=cfg.knn_score, center=center)
            if stats is not None:
                sqnorm = torch.linalg.vector_norm(noise.flatten(1).float(), dim=1).square() / x0[0].numel()  # [b]
                record_stats(stats, best.clamp_min(0).sqrt(), first.clamp_min(0).sqrt(), sqnorm)
        return x, noise
    full = torch.randn((shard.batch, *x.shape[1:]), generator=generator, dtype=x.dtype, device=x.device)  # [B, ...]
    mine = full[shard.rows]  # [b, C, H, W]: the vanilla draw of this shard
    if cfg.name != "linear" or shard.batch == 1:
        if stats is not None:
            record_unpaired_stats(stats, x, mine)
        return x, mine
    with torch.no_grad():
        if getattr(cfg, "scope", "global") == "global":
            order = global_order(x, full, cfg)[shard.rows]  # [b]: the global noise index of each of my images
            noise = full.index_select(0, order)
        elif shard.size > 1:
            cost, _, _ = linear.cost_matrix(x.flatten(1), mine.flatten(1), cfg.cost, cfg.quantize)
            noise = mine.index_select(0, torch.from_numpy(linear.solve(cost, cfg.solver)).to(x.device))
        else:
            noise = mine
        if stats is not None:
            flat = x.flatten(1).float()  # [b, D]
            chosen = torch.linalg.vector_norm(flat - noise.flatten(1).float(), dim=1)  # [b]
            random = torch.linalg.vector_norm(flat - mine.flatten(1).float(), dim=1)  # [b]
            record_stats(stats, chosen, random, noise.flatten(1).float().square().mean(dim=1))
    return x, noise


def global_order(x: Tensor, full: Tensor, cfg) -> Tensor:
    """The optimal assignment of the global batch (every rank's x gathered, in rank order) to the global draw
    `full`: solved on rank 0, sent to every rank. [B] int64 on x's device; order[i] = noise of image i."""
    images = torch.cat(distributed.all_gather(x))  # [B, C, H, W]
    order = torch.empty(full.shape[0], dtype=torch.long, device=x.device)
    if distributed.is_main():
        cost, _, _ = linear.cost_matrix(images.flatten(1), full.flatten(1), cfg.cost, cfg.quantize)
        order.copy_(torch.from_numpy(linear.solve(cost, cfg.solver)))
    return distributed.broadcast(order)
