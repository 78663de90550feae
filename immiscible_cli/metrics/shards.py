"""An FID point over several processes (torchrun; distributed.py): which images a rank makes, and how the ranks'
statistics become one.

The one-process point makes batches of `batch` seeds in order: [0, b), [b, 2b), ... Rank r of W makes batches
r, r + W, r + 2W, ... of that same sequence, so every image is made from its own seed in the same batch as by one
process (which matters for the adaptive dopri5 sampler, whose steps follow the batch). Each rank streams its
features into its own `FeatureStats`; the sums are then re-centred about one shift and all-reduced in float64, so the
mean and covariance equal the one-process ones up to float64 rounding (FID to 1e-8 relative or closer). KID's
features are gathered in the one-process order. Ranks beyond the number of batches make none.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import distributed
from .stats import FeatureStats


def batch_starts(num_images: int, batch: int) -> range:
    """The first seed of each batch this rank makes."""
    return range(0, num_images, batch)[distributed.rank()::distributed.world()]


def combine(stats: FeatureStats, nfe: list[int], num_images: int, batch: int,
            device: torch.device) -> tuple[FeatureStats, list[int]]:
    """Every rank's statistics and per-batch network evaluations as one process's (a collective; the identity in
    one process). `device`: where the sums travel (CUDA for NCCL, the CPU for gloo)."""
    if not distributed.active():
        return stats, nfe
    dim = next(d for d in distributed.all_gather_object(stats.dim) if d is not None)
    count = int(distributed.all_reduce(torch.tensor([stats.count], dtype=torch.float64, device=device)).item())
    weighted = stats.shift * stats.count if stats.count else np.zeros(dim)
    shift = (distributed.all_reduce(torch.from_numpy(weighted).to(device)) / max(count, 1)).cpu().numpy()
    centred_sum, centred_outer = stats.about(shift, dim)
    merged = FeatureStats(dim, keep_features=stats.keep_features)
    merged.count, merged.shift = count, shift
    merged.sum = distributed.all_reduce(torch.from_numpy(centred_sum).to(device)).cpu().numpy()
    merged.outer = distributed.all_reduce(torch.from_numpy(centred_outer).to(device)).cpu().numpy()
    if stats.keep_features:
        merged.kept = [_in_order(distributed.all_gather_object(stats.features()), num_images, batch)]
    return merged, [n for ranks in distributed.all_gather_object(nfe) for n in ranks]


def _in_order(per_rank: list[np.ndarray], num_images: int, batch: int) -> np.ndarray:
    """Features [N, D] in seed order from each rank's rows (its batches, in its order)."""
    world, taken, pieces = len(per_rank), [0] * len(per_rank), []
    for index, first in enumerate(range(0, num_images, batch)):
        rank, size = index % world, min(batch, num_images - first)
        pieces.append(per_rank[rank][taken[rank]:taken[rank] + size])
        taken[rank] += size
    return np.concatenate(pieces)
