"""Linear-assignment pairing (NeurIPS 2024 paper, "Immiscible Diffusion", the "one line of code").

Draw B noises for the B images (the vanilla draw), build the B x B cost between images (rows) and noises (columns),
solve the linear assignment problem min_sigma sum_i cost[i, sigma(i)] on the CPU (scipy, or LAPJV: `solver`), and give image i the
noise sigma(i). The result is a permutation of i.i.d. N(0, I) draws, so the batch's noise marginal stays exactly
Gaussian; labels stay with their image (only the noise moves). Cost: `l2` |x_i - n_j| (the papers' choice) or
`sqeuclidean` |x_i - n_j|^2 (optimal transport's). `quantize: fp16` is the papers' "quantized assignment".
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from immiscible_cli import distributed
from immiscible_cli.assigners import vanilla
from immiscible_cli.assigners.rule import Rule
from immiscible_cli.assigners.shard import Shard
from immiscible_cli.assigners.vanilla import draw_noise, record_stats, scale_images
from immiscible_cli.config import LinearAssigner
from immiscible_cli.errors import UserError

# fp16 operands times fp16 operands with an fp32 result: CUDA has it as an overload of mm (recent PyTorch).
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _gram_fp16(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T for fp16 operands, accumulated and returned in fp32.

    On CUDA this is a tensor-core fp16 GEMM. On the CPU fp16 GEMM is several times slower than fp32, so the same
    fp16-rounded operands are multiplied in fp32 instead: the product of two fp16 numbers is exact in fp32, so the
    two paths differ only in summation order.
    """
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b.T, out_dtype=torch.float32)
    return a.float() @ b.float().T


def cost_matrix(x: Tensor, noise: Tensor, cost: str, quantize: str) -> tuple[Tensor, Tensor, Tensor]:
    """Assignment cost between images (rows) and noises (columns), on their device.

    Args:
        x: images [B, D]; noise: noises [B, D]; cost: "l2" or "sqeuclidean"; quantize: "none" or "fp16".
    Returns:
        cost [B, B] (fp16 when quantized, else fp32/fp64), squared distances |x_i - n_j|^2 [B, B] (fp32/fp64, for
        the stats), squared noise norms |n_j|^2 [B].
    """
    dim = x.shape[1]
    if quantize == "fp16":
        # Pre-scale s = 1/sqrt(D), so every cost is a mean over coordinates: |s x - s n|^2 = mean_d (x_d - n_d)^2
        # <= (rms(x) + rms(n))^2 by the triangle inequality. Noise has rms ~1 and latents (std ~1) rms ~1, so the
        # cost is ~2 whatever D (D = 4*64*64 included) and stays finite in fp16 (max 65504) unless a sample's rms
        # exceeds ~250. Unscaled, |x - n|^2 ~ 2D = 32768 at D = 16384 and overflows as soon as rms(x) > ~1.7. The
        # Gram is accumulated in fp32 (no intermediate can overflow) and only the final cost is rounded to fp16;
        # cost ~2 sits in fp16's normal range, so quantization keeps fp16's full 2^-11 relative precision.
        scale = dim ** -0.5
        a = (x.float() * scale).half()  # [B, D]
        b = (noise.float() * scale).half()  # [B, D]
        sq_a = torch.linalg.vector_norm(a, dim=1, dtype=torch.float32).square()  # [B]
        sq_b = torch.linalg.vector_norm(b, dim=1, dtype=torch.float32).square()  # [B]
        sq = (sq_a[:, None] + sq_b[None, :]).sub_(_gram_fp16(a, b), alpha=2).clamp_min_(0)  # [B, B], / D units
        quantized = (sq.sqrt() if cost == "l2" else sq).half()  # [B, B] fp16: the quantized cost
        return quantized, sq * dim, sq_b * dim
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, noise = x.to(work), noise.to(work)
    sq_x = torch.linalg.vector_norm(x, dim=1).square()  # [B]
    sq_n = torch.linalg.vector_norm(noise, dim=1).square()  # [B]
    # |x_i - n_j|^2 = |x_i|^2 + |n_j|^2 - 2 x_i . n_j: one GEMM instead of a [B, B, D] difference tensor. Images
    # and noises are nearly orthogonal, so there is no catastrophic cancellation in fp32. (On CUDA the GEMM follows
    # torch's float32 matmul precision: with TF32 switched on it is about as coarse as the fp16 cost.)
    sq = torch.addmm(sq_x[:, None] + sq_n[None, :], x, noise.T, alpha=-2).clamp_min_(0)  # [B, B]
    return (sq.sqrt() if cost == "l2" else sq), sq, sq_n


class SolverMissing(UserError):
    """`assigner.solver: lapjv` without the `lap` package installed."""


def lap_module():
    """The optional `lap` package (LAPJV), or a one-line error saying how to install it."""
    try:
        import lap
    except ImportError:
        raise SolverMissing("assigner.solver: lapjv needs the `lap` package; install it with "
                            "pip install 'immiscible[lapjv]' (or pip install lap), or set assigner.solver=scipy") from None
    return lap


def solve(cost: Tensor, solver: str = "scipy") -> np.ndarray:
    """Optimal assignment for a [B, B] cost: `order[i]` is the noise (column) given to image (row) i.

    scipy returns (row_ind, col_ind) with col_ind[t] matched to row_ind[t]; writing order[row_ind] = col_ind keeps
    the direction right whatever order the rows come back in (the inverse permutation would be a silent bug).
    LAPJV returns x with x[i] the column of row i directly. With ties the two may pick different optimal
    assignments; their total cost is the same.
    """
    matrix = cost.cpu().to(torch.float64).numpy()
    if solver == "lapjv":
        _, x, _ = lap_module().lapjv(matrix, extend_cost=False)
        return np.asarray(x, dtype=np.int64)
    rows, cols = linear_sum_assignment(matrix)
    order = np.empty(cost.shape[0], dtype=np.int64)
    order[rows] = cols
    return order


def pair(x0: Tensor, cfg: LinearAssigner, generator: torch.Generator, stats: dict[str, Tensor] | None = None,
         center: Tensor | None = None, shard: Shard | None = None) -> tuple[Tensor, Tensor]:
    """Linear-assignment rule: (x0 * c, the batch's i.i.d. noises permuted to minimise the total cost).

    Args:
        x0: clean batch [B, C, H, W] in model space.
        cfg: the assigner config (`cost`, `quantize`, `image_scale`).
        generator: source of the noise draw, on x0's device.
        stats: when a dict, receives `pair_dist`, `random_dist` (identity pairing of the same draws), `noise_sqnorm`.
        shard: several processes: x0 is this process's rows of the global batch (`pair_shard`).
    Returns:
        (x0_paired, noise) shaped, typed and placed like x0; B = 1 is the vanilla draw.
    """
    if shard is not None:
        return pair_shard(x0, cfg, generator, stats, shard)
    batch = x0.shape[0]
    if batch == 1:  # nothing to permute
        return vanilla.pair(x0, cfg, generator, stats)
    x0_paired = scale_images(x0, cfg.image_scale)
    noise = draw_noise(x0_paired, generator)  # [B, C, H, W], the vanilla draw
    with torch.no_grad():
        cost, sq_dist, sq_noise = cost_matrix(x0_paired.flatten(1), noise.flatten(1), cfg.cost, cfg.quantize)
        order = torch.from_numpy(solve(cost, cfg.solver)).to(noise.device)  # [B]; the host sync this rule cannot avoid
        paired_noise = noise.index_select(0, order)  # [B, C, H, W]: image i gets noise order[i]
        if stats is not None:
            chosen = sq_dist[torch.arange(batch, device=noise.device), order]  # [B]
            record_stats(stats, chosen.sqrt(), sq_dist.diagonal().sqrt(), sq_noise / noise[0].numel())
    return x0_paired, paired_noise


def pair_shard(x0: Tensor, cfg: LinearAssigner, generator: torch.Generator, stats: dict[str, Tensor] | None,
               shard: Shard) -> tuple[Tensor, Tensor]:
    """The rule on one process's rows x0 [b, C, H, W] of the global batch; every rank draws the global vanilla draw.

    - scope `global` (the official code's choice): the images are gathered, rank 0 solves the assignment of the
      global batch to the global draw (cost and solver exactly as one process on the concatenated batch) and sends
      the permutation to every rank, which takes the noise of its rows. Rank 0 alone solves, so every rank uses the
      same permutation even where GPUs of different models would round a cost differently;
    - scope `local`: each rank assigns its shard to its rows of the global draw (a b x b problem).
    """
    x = scale_images(x0, cfg.image_scale)
    full, mine = shard.draw(x, generator)  # [B, C, H, W], its rows [b, C, H, W]
    if shard.batch == 1:
        if stats is not None:
            vanilla.record_unpaired_stats(stats, x, mine)
        return x, mine
    with torch.no_grad():
        if cfg.scope == "global":
            order = global_order(x, full, cfg)[shard.rows]  # [b]: the global noise index of each of my images
            noise = full.index_select(0, order)
        elif shard.size > 1:
            cost, _, _ = cost_matrix(x.flatten(1), mine.flatten(1), cfg.cost, cfg.quantize)
            noise = mine.index_select(0, torch.from_numpy(solve(cost, cfg.solver)).to(x.device))
        else:
            noise = mine
        if stats is not None:
            flat = x.flatten(1).float()  # [b, D]
            chosen = torch.linalg.vector_norm(flat - noise.flatten(1).float(), dim=1)  # [b]
            random = torch.linalg.vector_norm(flat - mine.flatten(1).float(), dim=1)  # [b]
            record_stats(stats, chosen, random, noise.flatten(1).float().square().mean(dim=1))
    return x, noise


def global_order(x: Tensor, full: Tensor, cfg: LinearAssigner) -> Tensor:
    """The optimal assignment of the global batch (every rank's x gathered, in rank order) to the global draw
    `full`: solved on rank 0, sent to every rank. [B] int64 on x's device; order[i] = noise of image i."""
    images = torch.cat(distributed.all_gather(x))  # [B, C, H, W]
    order = torch.empty(full.shape[0], dtype=torch.long, device=x.device)
    if distributed.is_main():
        cost, _, _ = cost_matrix(images.flatten(1), full.flatten(1), cfg.cost, cfg.quantize)
        order.copy_(torch.from_numpy(solve(cost, cfg.solver)))
    return distributed.broadcast(order)


def check_available(cfg: LinearAssigner) -> None:
    """The LAPJV solver needs the optional `lap` package: a one-line error now rather than at the first step."""
    if cfg.solver == "lapjv":
        lap_module()


RULE = Rule(pair, waits_for_host=True, check_available=check_available)
