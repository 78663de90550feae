"""Counter-based per-image noise: the Gaussian draws of a whole batch in one vectorised computation, image i's
values a pure function of (its seed, the draw's number, the element's index), so whatever batch it is made in.

`sample.noise: counter` uses it instead of `generation.SeededNoise` (one torch.Generator and one small kernel per
image, slow for batches of thousands on a GPU). The bits come from Philox4x32-10 (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011; the generator of cuRAND and of torch's CUDA RNG), written with int64 torch
ops so that it runs the same on every device: key = the image's 64-bit seed, counter = (block of 4 elements, draw
number, DOMAIN, 0). Four 32-bit words give four N(0, 1) values by the Box-Muller transform in float32.

The values differ from `SeededNoise`'s (another generator), so a run's images and FIDs depend on `sample.noise`,
which every fid.jsonl row records.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments (Weyl sequence)
ROUNDS = 10
DOMAIN = 0x696D6D69  # third counter word: keeps these draws apart from any other use of the same seeds


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * multiplier for int64 tensors holding uint32 values, without int64 overflow:
    the constant is split in 16-bit halves, so every partial product stays below 2^49."""
    low_part = a * (multiplier & 0xFFFF)  # < 2^48
    high_part = a * (multiplier >> 16)  # < 2^48, weighs 2^16
    middle = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    return (high_part >> 16) + (middle >> 32), middle & MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Philox4x32-10 of broadcastable int64 tensors holding uint32 words: 4 counter words, 2 key words -> 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return [c0, c1, c2, c3]


def _uniform(word: torch.Tensor) -> torch.Tensor:  # uint32 in int64 -> float32 in (0, 1), never 0 or 1
    return ((word >> 8).to(torch.float32) + 0.5) * 2.0 ** -24


def counter_normal(seeds: Sequence[int], draw: int, shape: Sequence[int], device: torch.device | str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) values [len(seeds), *shape]: row i depends only on (seeds[i], draw), never on the other rows."""
    if any(not 0 <= int(s) < 2**64 for s in seeds):
        raise ValueError("counter noise: seeds must be in 0..2^64-1")
    size = math.prod(shape)
    blocks = (size + 3) // 4
    key0 = torch.tensor([int(s) & MASK32 for s in seeds], dtype=torch.int64, device=device)[:, None]  # [B, 1]
    key1 = torch.tensor([int(s) >> 32 for s in seeds], dtype=torch.int64, device=device)[:, None]  # [B, 1]
    block = torch.arange(blocks, dtype=torch.int64, device=device)[None, :]  # [1, J]
    fixed = torch.zeros((1, 1), dtype=torch.int64, device=device)
    words = philox4x32((block, fixed + (draw & MASK32), fixed + DOMAIN, fixed), (key0, key1))  # 4 x [B, J]
    radius = [torch.sqrt(-2.0 * torch.log(_uniform(w))) for w in words[0::2]]  # Box-Muller, 2 x [B, J]
    angle = [2.0 * math.pi * _uniform(w) for w in words[1::2]]
    values = torch.stack([radius[0] * torch.cos(angle[0]), radius[0] * torch.sin(angle[0]),
                          radius[1] * torch.cos(angle[1]), radius[1] * torch.sin(angle[1])], dim=-1)  # [B, J, 4]
    return values.reshape(len(seeds), blocks * 4)[:, :size].reshape(len(seeds), *shape).to(dtype)


class CounterNoise:
    """`randn_like(x)` draws x[i] from seed i with counter noise: the k-th call of a batch gives every image its own
    k-th draw, so image i is the same at any batch size (as with `generation.SeededNoise`, other values)."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.seeds, self.device, self.draws = [int(s) for s in seeds], device, 0

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        noise = counter_normal(self.seeds, self.draws, x.shape[1:], x.device, x.dtype)
        self.draws += 1
        return noise
