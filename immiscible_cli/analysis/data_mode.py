"""Data mode: the papers' measurements of a pairing rule on a preset's own batches, with no training.

For each of `batches` batches (train.batch_size images from the preset's data, in the training order and flips of
its seed) the rule pairs the batch with noise, and from the pair (x0' = c x0, n):
- per noise level (levels.py): the batch posterior of the own image, the accuracy of picking it and the
  irreducible loss of the best batch-posterior denoiser (posterior.py states the construction and its limits);
- the image-noise distance reduction (mean |x0' - n_random| - mean |x0' - n|) / mean |x0' - n_random| against a
  random pairing of the same batch, and the noise-norm bias mean |n|^2 / D (the assigners' own `stats`);
- Gaussianity of the chosen noise: per-dimension mean and variance over all N = batches x B noises (max |mean|,
  mean variance; N(0, I) gives about 0 and 1), and a one-sample Kolmogorov-Smirnov test (scipy.stats.kstest)
  of the projections of every noise onto `directions` fixed random orthonormal directions against N(0, 1): for
  N(0, I) noise these N x directions values are independent N(0, 1), so the p-value is uniform. Random
  directions are nearly blind to a tilt along the data (in high dimension a random direction is almost orthogonal
  to the data mean), so the same test is also made along the data (`data_directions`): the unit direction of the
  training set's mean image and its top DATA_COMPONENTS principal components (of a seeded sample of at most
  DATA_SAMPLE images, mirror images included when training flips), each with the projections' mean (in sd units
  of N(0, 1)), variance and KS p-value;
- miscibility, the papers' number whose construction they do not fully specify. Ours: `probes` fixed images (the
  data set's first ones, unflipped) are put in place of the first rows of each batch and paired again with a
  separate random stream, so each probe image i gets R = `batches` noise draws n_i^r, a "noise cluster" with
  centre m_i = mean_r n_i^r. miscibility = sqrt(mean over probe pairs i < j of |m_i - m_j|^2 - (v_i + v_j) / R),
  the RMS L2 distance between cluster centres with the finite-draw floor removed (v_i: the unbiased total variance
  of cluster i; draws treated as independent), so vanilla gives about 0 for any R and larger = noise clusters
  further apart = less miscible. `miscibility_raw` is the plain mean |m_i - m_j| over probe pairs, which includes
  the floor sqrt(2 D / R) of vanilla.
The pairing draws of batch b come from a generator seeded by (seed, b) alone, so every rule sees the same batches
and the same first draw: KNN's candidate 0 and linear assignment's draw are vanilla's noise, and KNN with k = 1
gives vanilla's numbers exactly. Everything runs on the CPU in float64 where it is summed.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from scipy import stats as scipy_stats

from .. import assigners
from ..assigners import AssignerConfig
from ..config import Config
from ..console import Progress
from ..data import BatchStream, ImageSet, mean_image, to_model_space
from ..objectives import build_objective
from .levels import noise_level
from .posterior import batch_grams, batch_measures

DEFAULT_BATCHES = 100
DEFAULT_PROBES = 16
DEFAULT_DIRECTIONS = 32
PROBE_STREAM = 1 << 20  # offset of the probe draws' seeds from the batches' (a separate random stream)


@dataclass(frozen=True)
class DataSettings:
    """How much data mode measures: batches, noise levels, probe images and projection directions."""

    batches: int = DEFAULT_BATCHES
    levels: tuple[float, ...] = ()
    probes: int = DEFAULT_PROBES
    directions: int = DEFAULT_DIRECTIONS


DATA_COMPONENTS = 3  # principal components of the data tested besides its mean direction
DATA_SAMPLE = 10_000  # images behind the principal components at most (a seeded sample of larger sets)


def data_directions(images: ImageSet, hflip: bool, components: int = DATA_COMPONENTS,
                    cap: int = DATA_SAMPLE) -> tuple[list[str], torch.Tensor]:
    """Names and unit directions [D, q] along the data: the mean image's direction, then the top `components`
    principal components (float64; deterministic: a sample seeded 0, mirror images added when training flips)."""
    mean = mean_image(images, hflip).flatten().double()  # [D]
    chosen = images.images
    if len(chosen) > cap:
        chosen = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(0))[:cap].sort().values]
    x = to_model_space(chosen).double()  # [N, C, H, W]
    if hflip:
        x = torch.cat([x, x.flip(-1)])
    centred = x.flatten(1) - x.flatten(1).mean(dim=0)  # [N, D]
    count = min(components, centred.shape[0] - 1, centred.shape[1])
    vectors = torch.linalg.svd(centred, full_matrices=False).Vh[:max(count, 0)].T if count > 0 else \
        torch.zeros(mean.shape[0], 0, dtype=torch.float64)  # [D, q]
    names, columns = [], []
    if float(mean.norm()) > 0:
        names.append("data mean")
        columns.append(mean / mean.norm())
    for i in range(vectors.shape[1]):
        names.append(f"PC{i + 1}")
        columns.append(vectors[:, i])
    return names, torch.stack(columns, dim=1) if columns else torch.zeros(mean.shape[0], 0, dtype=torch.float64)


def batch_seed(seed: int, index: int) -> int:
    """Seed of the pairing draws of batch `index` of a run seeded `seed` (the same for every rule)."""
    return seed * 1_000_003 + index


class NoiseMoments:
    """Streaming per-dimension sums of the chosen noise and its projections onto fixed orthonormal directions."""

    def __init__(self, dim: int, directions: int, seed: int,
                 along: tuple[list[str], torch.Tensor] | None = None):
        """`along`: named unit directions [D, q] of the data (data_directions), tested one by one."""
        self.along_names, self.along = along or ([], torch.zeros(dim, 0, dtype=torch.float64))
        self.along_projections: list[torch.Tensor] = []
        self.sum = torch.zeros(dim, dtype=torch.float64)  # [D]
        self.sum_sq = torch.zeros(dim, dtype=torch.float64)  # [D]
        self.count = 0
        basis = torch.randn(dim, min(directions, dim), generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
        self.basis = torch.linalg.qr(basis).Q  # [D, P], orthonormal columns
        self.projections: list[torch.Tensor] = []

    def add(self, noise: torch.Tensor) -> None:
        flat = noise.flatten(1).double()  # [B, D]
        self.sum += flat.sum(dim=0)
        self.sum_sq += flat.square().sum(dim=0)
        self.count += flat.shape[0]
        self.projections.append(flat @ self.basis)  # [B, P]
        self.along_projections.append(flat @ self.along)  # [B, q]

    def summary(self) -> dict[str, float]:
        mean = self.sum / self.count  # [D]
        variance = (self.sum_sq / self.count - mean.square()) * self.count / max(self.count - 1, 1)  # [D]
        values = torch.cat(self.projections).flatten().numpy()
        test = scipy_stats.kstest(values, "norm")
        along = torch.cat(self.along_projections)  # [N, q]
        rows = []
        for i, name in enumerate(self.along_names):
            column = along[:, i]
            fit = scipy_stats.kstest(column.numpy(), "norm")
            rows.append({"direction": name, "mean": float(column.mean()), "variance": float(column.var()),
                         "ks_statistic": float(fit.statistic), "ks_pvalue": float(fit.pvalue)})
        return {"max_abs_mean": float(mean.abs().max()), "mean_variance": float(variance.mean()),
                "ks_statistic": float(test.statistic), "ks_pvalue": float(test.pvalue), "ks_values": int(values.size),
                "data_directions": rows}


class NoiseClusters:
    """The noises drawn for each probe image over R draws: centres and spreads (the miscibility number)."""

    def __init__(self, probes: int, dim: int):
        self.sum = torch.zeros(probes, dim, dtype=torch.float64)  # [P, D]
        self.sum_sq = torch.zeros(probes, dtype=torch.float64)  # [P]
        self.draws = 0

    def add(self, noise: torch.Tensor) -> None:
        flat = noise.flatten(1).double()  # [P, D]
        self.sum += flat
        self.sum_sq += flat.square().sum(dim=1)
        self.draws += 1

    def summary(self) -> dict[str, float | int | None]:
        probes, draws = self.sum.shape[0], self.draws
        if probes < 2 or draws < 2:
            return {"miscibility": None, "miscibility_raw": None, "probes": probes, "draws": draws}
        centres = self.sum / draws  # [P, D]
        spread = (self.sum_sq - draws * centres.square().sum(dim=1)) / (draws - 1)  # [P], unbiased total variance
        pairs = torch.triu_indices(probes, probes, offset=1)  # [2, P(P-1)/2]
        sq = torch.cdist(centres, centres).square()[pairs[0], pairs[1]]  # [pairs]
        floor = (spread[pairs[0]] + spread[pairs[1]]) / draws
        return {"miscibility": math.sqrt(max(float((sq - floor).mean()), 0.0)),
                "miscibility_raw": float(sq.sqrt().mean()), "probes": probes, "draws": draws}


def measure(cfg: Config, rule: AssignerConfig, images: ImageSet, settings: DataSettings,
            progress: Progress | None = None, what: str = "batches") -> dict[str, Any]:
    """Data mode's numbers for pairing rule `rule` on cfg's batches (train.batch_size images, cfg.seed's order)."""
    objective = build_objective(cfg.objective)
    points = [noise_level(objective, level) for level in settings.levels]
    stream = BatchStream(images, cfg.train.batch_size, torch.device("cpu"), cfg.seed, cfg.data.hflip,
                         resident=False)
    flips = torch.Generator().manual_seed(cfg.seed)
    probe_count = min(settings.probes, cfg.train.batch_size, len(images))
    probes = to_model_space(images.images[:probe_count])  # [P, C, H, W], unflipped
    dim = probes[0].numel()
    sums = {key: torch.zeros(len(points), dtype=torch.float64) for key in ("posterior", "correct", "irreducible")}
    distances = {key: 0.0 for key in ("pair_dist", "random_dist", "noise_sqnorm")}
    moments = NoiseMoments(dim, settings.directions, cfg.seed, data_directions(images, cfg.data.hflip))
    clusters = NoiseClusters(probe_count, dim)
    center = assigners.center_for(rule, lambda: mean_image(images, cfg.data.hflip))
    for index in range(settings.batches):
        x0, _ = stream.next(flips)  # [B, C, H, W] in [-1, 1]
        stats: dict[str, torch.Tensor] = {}
        generator = torch.Generator().manual_seed(batch_seed(cfg.seed, index))
        x0_paired, noise = assigners.pair(x0, rule, generator, stats, center)
        grams = batch_grams(x0_paired, noise)
        for key, values in batch_measures(grams, points, dim).items():  # [L, B] each
            sums[key] += values.sum(dim=1)
        for key in distances:
            distances[key] += float(stats[key])
        moments.add(noise)
        probe_batch = torch.cat([probes, x0[probe_count:]])  # the probes in place of the batch's first rows
        _, probe_noise = assigners.pair(probe_batch, rule, torch.Generator().manual_seed(
            batch_seed(cfg.seed, index) + PROBE_STREAM), center=center)
        clusters.add(probe_noise[:probe_count])
        if progress is not None:
            progress(index + 1, settings.batches, what)
    count = settings.batches * cfg.train.batch_size
    per_level = [{**point.to_dict(), "posterior_mean": float(sums["posterior"][p] / count),
                  "accuracy": float(sums["correct"][p] / count),
                  "irreducible_loss": float(sums["irreducible"][p] / count)} for p, point in enumerate(points)]
    pair_dist, random_dist = (distances[key] / settings.batches for key in ("pair_dist", "random_dist"))
    return {"levels": per_level, "pair_dist": pair_dist, "random_dist": random_dist,
            "distance_reduction": (random_dist - pair_dist) / random_dist if random_dist > 0 else 0.0,
            "noise_sqnorm": distances["noise_sqnorm"] / settings.batches, **clusters.summary(),
            "gaussianity": moments.summary(), "images": count, "batch_size": cfg.train.batch_size,
            "dimensions": dim}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one CPU thread: every tensor here is small (B x B, B x D), where a thread pool's
    synchronisation costs more than it saves (10x slower on a busy 2-core machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def analyze_presets(configs: list[tuple[str, Config]], settings: DataSettings,
                    progress: Progress | None = None) -> list[dict[str, Any]]:
    """One line per preset (its own rule) plus its vanilla baseline: vanilla pairing, image_scale 1, on the same
    batches. A baseline several presets share (same data, batch size, seed, objective) is measured and listed
    once, as is a preset that is itself that baseline. Each line names its baseline's label."""
    from ..config import VanillaAssigner
    from ..data import load_images

    images: dict[str, ImageSet] = {}
    lines: dict[str, dict[str, Any]] = {}
    baselines: list[tuple[str, str, Config]] = []  # (key, preset label, config)

    def line(label: str, cfg: Config, rule: AssignerConfig, role: str) -> str:
        data_key = _key(cfg.data.model_dump())
        key = _key(data_key, cfg.train.batch_size, cfg.seed, cfg.objective.model_dump(), rule.model_dump())
        if key not in lines:
            if data_key not in images:
                images[data_key] = load_images(cfg.data)
            lines[key] = {"label": label, "role": role, "preset": cfg.name, "assigner": rule.model_dump(),
                          "objective": cfg.objective.kind, "data": cfg.data.source, "seed": cfg.seed,
                          **measure(cfg, rule, images[data_key], settings, progress, f"{label}: batches")}
        return key

    with one_thread():
        for label, cfg in configs:
            own = line(label, cfg, cfg.assigner, "preset")
            baselines.append((own, label, cfg))
        distinct = {_key(c.data.model_dump(), c.train.batch_size, c.seed, c.objective.model_dump())
                    for _, _, c in baselines}
        for own, label, cfg in baselines:
            name = "vanilla" if len(distinct) == 1 else f"vanilla [{label}]"
            key = line(name, cfg, VanillaAssigner(), "baseline")
            lines[own]["baseline"] = lines[key]["label"]
    return list(lines.values())
