"""KNN noise selection (improved paper, "Improved Immiscible Diffusion"): each image keeps the nearest (in L2) of
k fresh candidates n_1..n_k ~ N(0, I). Per image, O(B k D), no coupling across the batch; k = 1 is vanilla.

Scores (`assigner.knn_score`), each minimised over the k candidates of an image x:
- `l2`: |x - n|^2, the papers' rule. The kept noise is shorter than N(0, I)'s (E|n|^2/D < 1) and leans toward x,
  so on average toward the data mean, while sampling starts from N(0, I).
- `direction`: -(x . n) / |n|, i.e. the largest cosine between x and n. A Gaussian's norm and direction are
  independent and the choice reads directions only, so the kept |n|^2 is exactly chi^2_D; its mean leans toward
  the data mean (more than `l2`'s).
- `centred`: -((x - m) . n) / |n| with m the training set's mean image in model space (data.mean_image, passed as
  `center`): the norm exact as `direction`, and the mean of the kept noise near 0, since x - m averages to 0.

Random stream. Its layout is fixed by (B, D, k) alone, so results never depend on the memory budget or chunking:
candidate 0 of the whole batch is one randn call shaped like the batch, i.e. exactly the vanilla draw; candidates
1..k-1 follow in randn calls of g = max(1, DRAW_GROUP_ELEMENTS // (B D)) candidates each ([g, B, C, H, W]). So big
batches draw one candidate per call, and small ones several per call: on CUDA a call per candidate would otherwise
be launch-bound at small B D and lose to the published code's single [B, k, D] draw.

Memory. Candidates are held one chunk of whole draw groups at a time, sized by `plan_chunks` so that the chunk,
the two slots that carry the running best between chunks and (for half inputs) fp32 working copies stay within
`memory_budget_mib`. The floor is one draw group plus the carry slots (a group is at most max(64 MiB, one
[B, C, H, W] slab) in fp32): a randn call cannot be split without changing the stream, so a smaller budget is
exceeded, with a warning.

Distances. |x - n|^2 = |x|^2 + |n|^2 - 2 x . n, accumulated and compared in fp32, from a norm reduction and a
batched matrix-vector product per draw group (on CUDA, one-candidate groups use cdist's fused kernel): no
[B, k, D] difference tensor. The published code rounds the difference and the norm to fp16 (at D = 4x64x64 a
norm of ~181 is kept to a spacing of 0.125, so close candidates tie) and holds all B k D candidates in fp32 and
fp16 at once.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from immiscible_cli.assigners import vanilla
from immiscible_cli.assigners.vanilla import record_stats, scale_images
from immiscible_cli.assigners.rule import Rule
from immiscible_cli.assigners.shard import Shard
from immiscible_cli.config import KNNAssigner

DRAW_GROUP_ELEMENTS = 1 << 24
"""Elements per randn call for candidates 1..k-1 (at least one whole candidate). Part of the stream's definition:
changing it changes which noise a seed gives."""


def draw_groups(batch: int, dim: int, k: int) -> list[int]:
    """Candidates per randn call, in stream order: [1 (the vanilla draw), g, g, ..., rest], summing to k."""
    per_call = max(1, DRAW_GROUP_ELEMENTS // (batch * dim))
    return [1] + [min(per_call, k - 1 - start) for start in range(0, k - 1, per_call)]


def chunk_bytes(groups: list[int], batch: int, dim: int, itemsize: int, carried: bool = True) -> int:
    """Extra bytes `pair` holds while a chunk made of these draw groups is live (beyond x0 and the output).

    `carried`: the two slots that carry the running best between chunks (not needed when one chunk holds all k).
    """
    slab, work = batch * dim, 8 if itemsize == 8 else 4
    held = (sum(groups) + 2 * carried) * slab * itemsize  # candidate slots
    held += 2 * sum(groups) * batch * work  # scores and squared norms, [B, c]
    if itemsize != work:  # half inputs: fp32 copies of x and of the group being scored
        held += (1 + max(groups)) * slab * work
    return held


def plan_chunks(batch: int, dim: int, k: int, itemsize: int, budget_bytes: float,
                draw_batch: int | None = None) -> list[list[int]]:
    """Split the draw groups into chunks (consecutive, whole groups) whose `chunk_bytes` fit the budget.

    A chunk always holds at least one group, so a budget below one group is exceeded (see the module docstring).
    `draw_batch`: the batch the stream is drawn for when `batch` is one process's share of it (assigners/shard.py).
    """
    groups = draw_groups(draw_batch or batch, dim, k)
    if chunk_bytes(groups, batch, dim, itemsize, carried=False) <= budget_bytes:
        return [groups]
    chunks: list[list[int]] = [[]]
    for size in groups:
        if chunks[-1] and chunk_bytes(chunks[-1] + [size], batch, dim, itemsize) > budget_bytes:
            chunks.append([])
        chunks[-1].append(size)
    return chunks


def squared_distances(x: Tensor, sq_x: Tensor, candidates: Tensor) -> Tensor:
    """|x_i - n_ji|^2 [B, g] for images x [B, 1, D] (|x_i|^2 in sq_x [B]) and candidates [g, B, D], in x's dtype.

    |x|^2 + |n|^2 - 2 x . n with a norm reduction and a batched matrix-vector product (fp32 accumulation, no
    [g, B, D] difference tensor). On CUDA a single candidate is scored by cdist's direct kernel instead, which
    reads x and n once in one launch rather than n twice and x once in two.
    """
    group, batch = candidates.shape[:2]
    if candidates.is_cuda and group == 1:
        flat = candidates.transpose(0, 1)  # [B, 1, D], still contiguous
        return torch.cdist(x, flat, compute_mode="donot_use_mm_for_euclid_dist").square_().view(batch, 1)
    sq_n = torch.linalg.vector_norm(candidates, dim=2).square_()  # [g, B]
    base = (sq_n.T + sq_x[:, None]).unsqueeze(1)  # [B, 1, g]
    return torch.baddbmm(base, x, candidates.permute(1, 2, 0), alpha=-2).view(batch, group)  # [B, g]


def direction_scores(target: Tensor, candidates: Tensor) -> Tensor:
    """-(t_i . n_ji) / |n_ji| [B, g] for targets t [B, 1, D] and candidates [g, B, D]: minimal at the largest cosine
    (|t_i| is the same for all of an image's candidates, so it is left out). Accumulated in the inputs' dtype."""
    group, batch = candidates.shape[:2]
    norm = torch.linalg.vector_norm(candidates, dim=2).T.unsqueeze(1)  # [B, 1, g]
    return torch.bmm(target, candidates.permute(1, 2, 0)).div_(norm).neg_().view(batch, group)  # [B, g]


def _draw_and_score(slots: Tensor, chunk: list[int], generator: torch.Generator, draw_batch: int | None,
                    shard_rows: slice | None, x: Tensor, sq_x: Tensor, target: Tensor, score: str,
                    first_chunk: bool) -> tuple[Tensor, Tensor | None]:
    """Draw one chunk's candidate groups into slots[0:c] [c, B, C, H, W] and score them: (scores [B, c], and with
    a direction score on the first chunk candidate 0's |x - n|^2 [B], for the stats; else None). One randn call per
    draw group, in stream order, scored group by group: a group's scores are then bit-identical however the groups
    are chunked, so the budget never changes the result."""
    batch, dim = x.shape[0], x.shape[2]
    scores = torch.empty((batch, sum(chunk)), dtype=x.dtype, device=x.device)  # [B, c]
    first, start = None, 0
    for group in chunk:
        slab = slots[start:start + group]  # [g, B, C, H, W]
        if shard_rows is None:
            torch.randn(slab.shape, generator=generator, dtype=slab.dtype, device=slab.device, out=slab)
        else:  # the whole batch's draw [g, draw_batch, C, H, W], of which this process keeps its rows
            slab.copy_(torch.randn((group, draw_batch, *slab.shape[2:]), generator=generator, dtype=slab.dtype,
                                   device=slab.device)[:, shard_rows])
        flat = slab.view(group, batch, dim).to(x.dtype)  # [g, B, D]
        if score == "l2":
            scores[:, start:start + group] = squared_distances(x, sq_x, flat)
        else:
            scores[:, start:start + group] = direction_scores(target, flat)
            if first_chunk and start == 0:  # candidate 0, the vanilla draw: its L2 distance for the stats
                first = squared_distances(x, sq_x, flat[:1]).view(batch)
        start += group
    return scores, first


def select_nearest(x0: Tensor, k: int, generator: torch.Generator, budget_bytes: float,
                   draw_batch: int | None = None, shard_rows: slice | None = None, score: str = "l2",
                   center: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """For each image of x0 [B, C, H, W], the best of its k candidates by `score` (module docstring; `centred`
    needs `center` [C, H, W], the data mean in x0's space).

    Returns (noise [B, C, H, W], |x - n|^2 of the chosen [B], |x - n|^2 of candidate 0 [B]), the last two in fp32
    (fp64 for fp64 inputs). With `draw_batch` and `shard_rows`, x0 holds those rows of a batch of draw_batch images:
    every draw group is drawn for the whole batch (the stream of one process) and only these rows are scored.
    """
    if score == "centred" and center is None:
        raise ValueError("knn_score=centred needs the data mean (center)")
    batch, dim, itemsize = x0.shape[0], x0[0].numel(), x0.element_size()
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    chunks = plan_chunks(batch, dim, k, itemsize, budget_bytes, draw_batch)
    carried = len(chunks) > 1
    peak = max(chunk_bytes(chunk, batch, dim, itemsize, carried) for chunk in chunks)
    if peak > budget_bytes:
        warnings.warn(f"knn: memory_budget_mib={budget_bytes / 2**20:g} is below this batch's minimum (one random "
                      f"draw plus the running best): holding {peak / 2**20:.2f} MiB")
    x = x0.reshape(batch, 1, dim).to(work)  # [B, 1, D]
    sq_x = torch.linalg.vector_norm(x, dim=2).square_().view(batch)  # [B]
    target = x - center.reshape(1, 1, dim).to(x) if score == "centred" else x  # [B, 1, D]
    rows = torch.arange(batch, device=x0.device)
    capacity = max(sum(chunk) for chunk in chunks)
    # Slots: [carry | capacity candidates | carry] when the search spans several chunks. The running best lives
    # in one carry slot and each chunk's merge gathers straight into the other: one pass, no temporary.
    offset = 1 if carried else 0
    buffer = torch.empty((capacity + 2 * offset, *x0.shape), dtype=x0.dtype, device=x0.device)  # [slots, B, ...]
    rows_of = buffer.view(-1, dim)  # [slots * B, D]: row s * B + i is image i's candidate in slot s
    carry, best, first = None, None, None
    for index, chunk in enumerate(chunks):
        scores, drawn_first = _draw_and_score(buffer[offset:], chunk, generator, draw_batch, shard_rows, x, sq_x,
                                              target, score, index == 0)  # [B, c]
        first = drawn_first if drawn_first is not None else first
        chunk_best, pick = scores.min(dim=1)  # [B]; ties go to the first index, as over all k at once
        slot = pick + offset  # [B]
        if best is None:
            best = chunk_best
            first = scores[:, 0] if first is None else first
        else:
            better = chunk_best < best  # strict: on a tie the carried (earlier) candidate stays
            slot = torch.where(better, slot, carry)
            best = torch.minimum(best, chunk_best)
        if index == len(chunks) - 1:
            noise = rows_of.index_select(0, slot * batch + rows)  # [B, D], a fresh tensor
        else:
            carry = capacity + 1 if carry == 0 else 0
            source = 1 if carry == 0 else 0  # the slots read exclude the one written: no overlap
            torch.index_select(buffer[source:source + capacity + 1].view(-1, dim), 0,
                               (slot - source) * batch + rows, out=buffer[carry].view(batch, dim))
    if score != "l2":  # the chosen candidate's L2 distance, for the stats
        best = torch.linalg.vector_norm(x.view(batch, dim) - noise.to(work), dim=1).square_()
    return noise.view(x0.shape), best, first


def pair(x0: Tensor, cfg: KNNAssigner, generator: torch.Generator, stats: dict[str, Tensor] | None = None,
         center: Tensor | None = None, shard: Shard | None = None) -> tuple[Tensor, Tensor]:
    """KNN rule: (x0 * c, for each image the best by `cfg.knn_score` of k fresh N(0, I) candidates).

    Args:
        x0: clean batch [B, C, H, W] in model space.
        cfg: the assigner config (`k`, `knn_score`, `memory_budget_mib`, `image_scale`).
        generator: source of every candidate, on x0's device.
        stats: when a dict, receives `pair_dist`, `random_dist` (candidate 0, i.e. vanilla) and `noise_sqnorm`.
        center: the training set's mean image [C, H, W] in the scaled space (`knn_score: centred` only).
        shard: several processes: x0 is this process's rows of the global batch. Every candidate group is drawn
            for the whole batch (draw_groups of the global B: the same stream) and only the shard's rows are
            scored; knn is per image, so this is exactly the one-process result for these rows.
    Returns:
        (x0_paired, noise) shaped, typed and placed like x0; with k = 1 exactly the vanilla draw.
    """
    if cfg.k == 1:  # one candidate: nothing to choose, and no candidate buffer
        return vanilla.pair(x0, cfg, generator, stats, shard=shard)
    x0_paired = scale_images(x0, cfg.image_scale)
    with torch.no_grad():
        noise, best, first = select_nearest(x0_paired, cfg.k, generator, cfg.memory_budget_mib * 2**20,
                                            draw_batch=shard.batch if shard else None,
                                            shard_rows=shard.rows if shard else None,
                                            score=cfg.knn_score, center=center)
        if stats is not None:
            sqnorm = torch.linalg.vector_norm(noise.flatten(1).float(), dim=1).square() / x0[0].numel()  # [B]
            record_stats(stats, best.clamp_min(0).sqrt(), first.clamp_min(0).sqrt(), sqnorm)
    return x0_paired, noise


def needs_center(cfg: KNNAssigner) -> bool:
    """The `centred` score of more than one candidate scores against the training set's mean image."""
    return cfg.knn_score == "centred" and cfg.k > 1


RULE = Rule(pair, needs_center=needs_center)
