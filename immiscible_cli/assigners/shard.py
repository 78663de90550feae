"""One process's share of a global batch (several processes: distributed.py), the argument `shard` of every rule.

The sharding rule: every process draws the random numbers of the WHOLE global batch of B images from the run's
streams (the same seeds on every rank) and keeps rows [r b, (r + 1) b) of it, b = B / W for rank r of W. So each
image meets the same noise candidates whatever the world size, and the rules stay those of one process. Each rule
writes its own sharded form beside its one-process form (vanilla.py, knn.py, linear.py: `pair(..., shard=Shard)`);
tests/test_assigners.py runs every registered rule on two simulated ranks against one process.
The cost is W times the random draws of one process's batch: negligible beside the network's forward and backward.
`stats` are those of the shard's rows; the trainer averages them over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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

    def draw(self, like: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The vanilla draw of the whole global batch [B, C, H, W] (shaped like the shard `like` [b, C, H, W] but
        for B images, in its dtype and on its device, one randn call) and this shard's rows of it [b, C, H, W]."""
        full = torch.randn((self.batch, *like.shape[1:]), generator=generator, dtype=like.dtype, device=like.device)
        return full, full[self.rows]
