"""The public pairing API: immiscible noise for any training loop, one call per step (docs/API.md).

    import torch
    from immiscible_cli import pairing

    g = torch.Generator(device).manual_seed(0)
    x0, noise = pairing.pair(x0, "knn", g, k=8)   # x0: the clean batch [B, ...]; noise: paired with it, row by row
    # build x_t from (x0, noise) and regress on *this* noise (or on x0 - noise, v, ...), never on a fresh draw

Rules (`RULES`): `vanilla` (noise ~ N(0, I)), `linear` (the batch's noises permuted by an optimal assignment; cost
`l2` or `sqeuclidean`, `quantize` `none` or `fp16`, `solver` `scipy` or `lapjv`, `scope` `global` or `local` across
processes), `knn` (per sample, the best of `k` fresh candidates by `knn_score` `l2`, `direction` or `centred`,
within `memory_budget_mib`). Every rule takes `image_scale` (the data are multiplied by it before pairing; `decode`
divides generated samples by it). The parameters and their defaults are those of the config sections `assigner.*`
(immiscible_cli/config/methods.py), which `make_rule` builds and validates.

This is the code the trainer runs (it calls `pair_config`, the layer under `pair`), so the API's noise is the
trainer's noise for the same generator, bit for bit. Importing this module imports torch only; the rules (and
pydantic, and scipy) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from immiscible_cli.assigners.shard import Shard
    from immiscible_cli.config.methods import KNNAssigner, LinearAssigner, VanillaAssigner

    Rule = Union[VanillaAssigner, LinearAssigner, KNNAssigner]

RULES: tuple[str, ...] = ("vanilla", "linear", "knn")
"""The rule names `pair` and `make_rule` accept."""

STAT_KEYS: tuple[str, ...] = ("pair_dist", "random_dist", "pair_dist_reduction", "noise_sqnorm")
"""The keys `pair(..., stats=d)` writes into d (0-dim float32 tensors on the batch's device, no host sync):
pair_dist, the mean |x0'_i - noise_i| of the chosen pairing; random_dist, the same for the unpaired draw of the same
batch; pair_dist_reduction = (random_dist - pair_dist) / random_dist (0 for vanilla); noise_sqnorm, the mean
|noise_i|^2 / D (1 for Gaussian noise). The trainer logs the last three and the time per call,
averaged per tick."""


def __getattr__(name: str) -> Any:
    """`pairing.Rule`, the union of the three config sections, imported on first use (pydantic)."""
    if name == "Rule":
        from immiscible_cli.config.methods import KNNAssigner, LinearAssigner, VanillaAssigner

        return Union[VanillaAssigner, LinearAssigner, KNNAssigner]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_rule(name: str = "vanilla", *, image_scale: float | None = None, k: int | None = None,
              knn_score: str | None = None, memory_budget_mib: float | None = None, cost: str | None = None,
              quantize: str | None = None, solver: str | None = None, scope: str | None = None) -> Rule:
    """A validated rule: the config section `assigner` of the trainer (a pydantic model).

    Args:
        name: "vanilla", "linear" or "knn".
        image_scale: every rule; the data are multiplied by it before pairing (default 1.0, off).
        k, knn_score, memory_budget_mib: knn only (defaults 8, "l2", 1024.0).
        cost, quantize, solver, scope: linear only (defaults "l2", "none", "scipy", "global").
        A parameter left None takes the rule's default.
    Raises:
        ValueError: an unknown rule, a parameter the rule does not take, or a value out of range (one line).
    """
    if name not in RULES:
        raise ValueError(f"unknown pairing rule {name!r}; choose one of {', '.join(RULES)}")
    from pydantic import ValidationError

    from immiscible_cli.config.methods import ASSIGNER_SECTIONS

    given = {key: value for key, value in dict(image_scale=image_scale, k=k, knn_score=knn_score,
                                              memory_budget_mib=memory_budget_mib, cost=cost, quantize=quantize,
                                              solver=solver, scope=scope).items() if value is not None}
    section = ASSIGNER_SECTIONS[name]
    unused = sorted(set(given) - set(section.model_fields))
    if unused:
        raise ValueError(f"rule {name!r} takes no {', '.join(unused)}")
    try:
        return section(name=name, **given)
    except ValidationError as e:
        error = e.errors()[0]
        raise ValueError(f"rule {name!r}: {'.'.join(map(str, error['loc']))}: {error['msg']}") from None


def needs_center(rule: Rule) -> bool:
    """Whether `pair` must be given `center` (the data mean) for this rule: knn with knn_score="centred", k > 1
    (the rule's own `needs_center`)."""
    from immiscible_cli import assigners

    return assigners.needs_center(rule)


def pair(x0: Tensor, rule: Rule | str, generator: torch.Generator, *, center: Tensor | None = None,
         stats: dict[str, Tensor] | None = None, distributed: bool | None = None,
         **params: Any) -> tuple[Tensor, Tensor]:
    """Pair a clean batch with noise: one call per training step.

    Args:
        x0: the clean batch [B, ...] (images [B, C, H, W], latents, video latents [B, C, T, H, W], vectors [B, D]),
            any float dtype (fp16/bf16 included: distances are accumulated in fp32), on the CPU or CUDA.
        rule: a rule from `make_rule`, or a rule name with its parameters as keywords (`pair(x, "knn", g, k=8)`).
        generator: every random draw comes from it; a `torch.Generator` on x0's device. With several processes
            (below), seed it alike on every rank.
        center: the data mean, shaped like one sample (x0.shape[1:]) or with as many elements, in x0's space
            *before* image scaling (`data_mean` computes it; `pair` scales it). Needed by knn_score="centred" only.
        stats: a dict to receive the STAT_KEYS diagnostics (0-dim tensors, no host sync), or None.
        distributed: None (default) pairs this process's share of a global batch when a torch.distributed process
            group with more than one process is initialised (x0 holds this rank's rows, every rank the same number),
            else this batch alone; True requires the group, False ignores it. With a group, every rank draws the
            whole global batch's noise from `generator` and keeps its rows, so the result is the one-process
            result on the global batch: linear solves one assignment of the global batch on rank 0 (scope
            "global"; "local": one per rank), knn and vanilla are exactly per sample. `stats` are this rank's.
        **params: the rule's parameters when `rule` is a name (see `make_rule`).
    Returns:
        (x0', noise): x0' = x0 * image_scale (x0 itself when the scale is 1) and the noise paired with it, row i
        with row i; both shaped, typed and placed like x0. Build x_t and the regression target from this noise.
    Raises:
        ValueError: bad rule or parameters, x0 without a batch dimension, a generator on another device, a missing
            or mis-shaped `center`, `distributed=True` without a process group.
    """
    if isinstance(rule, str):
        rule = make_rule(rule, **params)
    elif params:
        raise ValueError(f"pass the rule's parameters to make_rule, not to pair: {', '.join(sorted(params))}")
    if x0.dim() < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a batch [B, ...] with B >= 1 and one or more values per sample; got shape "
                         f"{list(x0.shape)}")
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a float tensor; got {x0.dtype}")
    if generator.device.type != x0.device.type:
        raise ValueError(f"the generator is on {generator.device.type}, x0 on {x0.device.type}: make it with "
                         f"torch.Generator(x0.device)")
    scaled_center = None
    if needs_center(rule):
        if center is None:
            raise ValueError("knn_score='centred' needs center=, the data mean (pairing.data_mean(batches))")
        if center.numel() != x0[0].numel():
            raise ValueError(f"center has {center.numel()} values, a sample of x0 {x0[0].numel()} "
                             f"(shape {list(x0.shape[1:])})")
        from immiscible_cli import assigners

        scaled_center = assigners.center_for(rule, center)
    found = _process_shard(x0.shape[0], distributed)
    raw: dict[str, Tensor] | None = {} if stats is not None else None
    out = pair_config(x0, rule, generator, raw, scaled_center, found)
    if stats is not None:
        stats.update(raw)
        pair_dist, random_dist = raw["pair_dist"], raw["random_dist"]
        stats["pair_dist_reduction"] = torch.where(random_dist > 0, (random_dist - pair_dist) / random_dist,
                                                   torch.zeros_like(random_dist))
    return out


def pair_config(x0: Tensor, cfg: Rule, generator: torch.Generator, stats: dict[str, Tensor] | None = None,
                center: Tensor | None = None, shard: Shard | None = None) -> tuple[Tensor, Tensor]:
    """The layer under `pair` that the trainer calls (PairingMeter): a config section, `center` already in the
    scaled space (data mean x image_scale), the process's shard given explicitly (None: one process), `stats` with
    the rules' three keys. Any [B, ...] shape: other than [B, C, H, W] it is seen as [B, D, 1, 1], which draws the
    same random numbers (the rules read a sample as its D values in memory order). Not covered by the stability
    promise of docs/API.md; `pair` is."""
    from immiscible_cli import assigners

    given, shape = x0, x0.shape
    if x0.dim() != 4:
        x0 = x0.reshape(shape[0], -1, 1, 1)
        if center is not None:
            center = center.reshape(-1, 1, 1)
    x, noise = assigners.pair(x0, cfg, generator, stats, center, shard)  # each rule owns its sharded form
    if len(shape) != 4:
        x = given if x is x0 else x.reshape(shape)  # x0 itself when the scale is 1, as for [B, C, H, W]
        noise = noise.reshape(shape)
    return x, noise


def _process_shard(batch: int, distributed: bool | None) -> Shard | None:
    """This process's Shard of the global batch (`batch` rows on each rank) when pairing across processes."""
    if distributed is False:
        return None
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not group:
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    if not group or torch.distributed.get_world_size() == 1:
        return None
    from immiscible_cli.assigners.shard import Shard

    world = torch.distributed.get_world_size()
    return Shard(torch.distributed.get_rank(), world, batch * world)


def data_mean(data: Tensor | Iterable[Any], *, key: str | int = 0, max_samples: int | None = None) -> Tensor:
    """The mean sample, for `pair(..., center=...)` (knn_score="centred"), in the space of the batches given.

    Args:
        data: a tensor [N, ...], or an iterable of batches: tensors [b, ...], tuples/lists (their element `key`,
            default 0, e.g. a DataLoader's (images, labels)) or dicts (their entry `key`, e.g. "pixel_values").
        max_samples: stop after this many samples (the first ones; shuffle or subsample beforehand if needed).
    Returns:
        float32 [...] on the device of the batches, accumulated in float64 in the order given (the same bits on
        every process given the same batches). Apply the same transforms as training (e.g. averaging with the
        mirrored mean if training flips images).
    """
    batches = [data] if isinstance(data, Tensor) else data
    total, count = None, 0
    for batch in batches:
        if not isinstance(batch, Tensor):
            batch = batch[key]
        if max_samples is not None:
            batch = batch[:max_samples - count]
        if batch.shape[0] == 0:
            break
        part = batch.detach().to(torch.float64).sum(dim=0)
        total = part if total is None else total + part
        count += batch.shape[0]
        if max_samples is not None and count >= max_samples:
            break
    if total is None:
        raise ValueError("data_mean: no samples")
    return (total / count).to(torch.float32)


def decode(samples: Tensor, rule: Rule | float, *, clip: tuple[float, float] | None = (-1.0, 1.0)) -> Tensor:
    """Generated samples back to the data's range: divided by the rule's image_scale (or by the float given), then
    clamped to `clip` (default [-1, 1], pixels in model space; None for latents, clamp after the VAE decodes)."""
    scale = rule if isinstance(rule, (int, float)) else rule.image_scale
    out = samples / scale if scale != 1.0 else samples
    return out.clamp(*clip) if clip is not None else out


__all__ = ["RULES", "STAT_KEYS", "Rule", "data_mean", "decode", "make_rule", "needs_center", "pair"]
