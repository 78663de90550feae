"""Run mode: what a trained run's network does, measured as the papers argue it (EMA weights of one snapshot).

- Loss per noise-level bin on held-out images (`held_out`): in each of `bins` equal bins of the noise level
  (levels.py; 0 = clean, 1 = noise) every image gets a time drawn uniformly in the bin and the objective's own
  per-sample loss, once with the noise of the run's assigner and once with vanilla noise at the run's image scale
  (the noise sampling starts from), on the same images, times and first random draw. Images are paired in batches
  of train.batch_size, as in training.
- Bijectivity: fixed starting noises n_s (image s's noise, exactly as `immiscible sample` draws it) are perturbed
  to sqrt(1 - W^2) n_s + W n'_s with n'_s ~ N(0, I) from another seed (still exactly N(0, I); W = 0.1, 0.2, 0.3 by
  default, the correlation with n_s is sqrt(1 - W^2)), and the sample made from each is compared with the one from
  n_s: mean per-image RMS and L2 pixel distance in data space [-1, 1], that distance over the distance between
  unrelated samples (image s and s + 1), and the L2 distance of Inception pool features when FID weights are
  found by the lookup `eval` uses (else that column is skipped with a note). Stochastic samplers reuse each
  image's own fresh noise, so only the start differs. The run's sampler, steps and sample.* options are used.
- Diversity: each unperturbed sample's nearest neighbour among the training images and among the other samples
  (per-pixel RMS distance), next to the same numbers for as many held-out real images (a memorising model's
  samples sit much closer to the training set than held-out images do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import assigners
from ..config import Config, VanillaAssigner
from ..console import Progress, note as say
from ..data import DataError, ImageSet, load_images, mean_image, to_model_space, to_uint8
from ..datasets import SOURCES
from ..metrics import FIDExtractor, FIDWeightsError
from ..networks import load_network, pick_device
from ..objectives import build_objective
from ..runs import Run
from ..generation import SeededNoise
from .levels import times_in_bin

PERTURBATIONS: tuple[float, ...] = (0.1, 0.2, 0.3)
PERTURB_SEED_OFFSET = 1 << 40  # n'_s is drawn from seed s + this offset
GRID_SEEDS = 8  # columns of the bijectivity image grid


@dataclass(frozen=True)
class RunSettings:
    """What run mode measures and with what: checkpoint, held-out images, bins, samples, steps, device, Inception."""

    ckpt: str = "latest"
    images: int = 512
    bins: int = 10
    samples: int = 64
    steps: int | None = None
    perturbations: tuple[float, ...] = PERTURBATIONS
    device: str = "auto"
    inception: Path | None = None
    use_inception: bool = True


def held_out(cfg: Config) -> tuple[ImageSet, str]:
    """Images the run did not train on, and a note saying which: the other split (a source with two), else
    the images past data.max_images, else (with a note) the training images themselves."""
    data = cfg.data.model_copy(update={"max_images": None})
    if len(SOURCES[data.source].splits) > 1:
        other = "test" if data.split == "train" else "train"
        try:
            return load_images(data, split=other), f"the {other} split"
        except DataError as e:
            problem = f"the {other} split cannot be read ({e}); "
    else:
        problem = ""
    if cfg.data.max_images is not None:
        full = load_images(data)
        if len(full) > cfg.data.max_images:
            rest = slice(cfg.data.max_images, None)
            return (ImageSet(full.images[rest], full.labels[rest], full.num_classes, full.name),
                    f"{problem}the {len(full) - cfg.data.max_images} images after data.max_images")
    return load_images(cfg.data), f"{problem}the training images (no held-out images for this source)"


@torch.inference_mode()
def loss_per_bin(net: torch.nn.Module, cfg: Config, images: ImageSet, settings: RunSettings,
                 device: torch.device) -> dict[str, Any]:
    """Mean per-sample loss in each noise-level bin under the run's rule (`own`) and vanilla noise."""
    objective = build_objective(cfg.objective)
    rules = {"own": cfg.assigner, "vanilla": VanillaAssigner(image_scale=cfg.assigner.image_scale)}
    center = assigners.center_for(cfg.assigner, lambda: mean_image(images, cfg.data.hflip))  # KNN's centred score
    count, batch = min(settings.images, len(images)), cfg.train.batch_size
    sums = {name: [0.0] * settings.bins for name in rules}
    conditional = cfg.model.num_classes is not None
    for index, start in enumerate(range(0, count, batch)):
        x0 = to_model_space(images.images[start:min(start + batch, count)])  # [b, C, H, W]
        labels = images.labels[start:start + len(x0)].to(device) if conditional else None
        for k in range(settings.bins):
            seed = (cfg.seed * 1_000_003 + index) * 1_009 + k
            t = times_in_bin(objective, k / settings.bins, (k + 1) / settings.bins, len(x0),
                             torch.Generator().manual_seed(seed)).to(device)  # [b]
            for name, rule in rules.items():  # the same first draw: KNN's candidate 0 is the vanilla noise
                x0_paired, noise = assigners.pair(x0, rule, torch.Generator().manual_seed(seed), center=center)
                loss = objective.loss(net, x0_paired.to(device), noise.to(device), t, labels)  # [b]
                sums[name][k] += float(loss.double().sum())
    return {"images": count, "bins": [{"low": k / settings.bins, "high": (k + 1) / settings.bins,
                                       **{name: sums[name][k] / count for name in rules}}
                                      for k in range(settings.bins)]}


def noise_source(cfg: Config, seeds: list[int], device: torch.device):
    """Per-image noise for these seeds, as `generation.generate` draws it (`sample.noise`, where the config has it)."""
    if getattr(cfg.sample, "noise", "per-image") == "counter":
        from ..counter_noise import CounterNoise

        return CounterNoise(seeds, device)
    return SeededNoise(seeds, device)


@torch.inference_mode()
def perturbed_samples(net: torch.nn.Module, cfg: Config, seeds: list[int], weight: float, *, sampler: str,
                      steps: int, device: torch.device) -> torch.Tensor:
    """Decoded samples [N, C, H, W] in [-1, 1] from sqrt(1 - W^2) n_s + W n'_s; W = 0 gives `generation.generate`'s
    images (same noise, same fresh noise, same options) before their rounding to uint8."""
    objective = build_objective(cfg.objective)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    clip_x0 = cfg.assigner.image_scale if cfg.sample.clip_x0 else None
    out = []
    for start in range(0, len(seeds), cfg.sample.batch_size):
        chunk = seeds[start:start + cfg.sample.batch_size]
        source = noise_source(cfg, chunk, device)
        noise = source.randn_like(torch.empty((len(chunk), *shape), device=device))  # [b, C, H, W]
        if weight:
            other = noise_source(cfg, [s + PERTURB_SEED_OFFSET for s in chunk], device).randn_like(noise)
            noise = math.sqrt(1.0 - weight * weight) * noise + weight * other
        labels = (torch.tensor([s % cfg.model.num_classes for s in chunk], device=device)
                  if cfg.model.num_classes is not None else None)
        x = objective.sample(net, noise, sampler=sampler, steps=steps, eta=cfg.sample.eta, labels=labels,
                             guidance=cfg.sample.guidance, randn=source.randn_like, clip_x0=clip_x0,
                             grid=cfg.sample.ddim_grid, atol=cfg.sample.ode_atol, rtol=cfg.sample.ode_rtol)
        out.append(assigners.decode(x.float(), cfg.assigner).cpu())
    return torch.cat(out)


def _features(cfg: Config, settings: RunSettings, device: torch.device) -> tuple[FIDExtractor | None, str]:
    """The Inception extractor `eval` would use, or None and why the feature column is skipped."""
    if not settings.use_inception:
        return None, "Inception feature distances skipped (--no-inception)"
    try:
        return FIDExtractor(cfg.eval.mode, device, weights=settings.inception,
                            batch_size=cfg.eval.batch_size), "Inception pool features (clean-fid pipeline)"
    except FIDWeightsError as e:
        if settings.inception is not None:
            raise
        return None, f"Inception feature distances skipped: {e}"


def bijectivity(net: torch.nn.Module, cfg: Config, settings: RunSettings,
                device: torch.device) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """(the numbers, the unperturbed samples [S, C, H, W] in [-1, 1], uint8 grid rows [(1 + len W) * g, ...])."""
    seeds = list(range(settings.samples))
    sampler, steps = cfg.sample.sampler, settings.steps or cfg.sample.steps
    made = {w: perturbed_samples(net, cfg, seeds, w, sampler=sampler, steps=steps, device=device)
            for w in (0.0, *settings.perturbations)}
    base = made[0.0].flatten(1)  # [S, D]
    extractor, note = _features(cfg, settings, device)
    features = {w: torch.from_numpy(extractor.features([to_uint8(x)])) for w, x in made.items()} \
        if extractor is not None else {}

    def distances(other: torch.Tensor, feats: torch.Tensor | None) -> dict[str, float | None]:
        diff = other.flatten(1) - base  # [S, D]
        return {"pixel_rms": float(diff.square().mean(dim=1).sqrt().mean()),
                "pixel_l2": float(diff.norm(dim=1).mean()),
                "feature_l2": None if feats is None else float((feats - features[0.0]).norm(dim=1).mean())}

    unrelated = distances(made[0.0].roll(1, dims=0), features[0.0].roll(1, dims=0) if features else None)
    rows = []
    for w in settings.perturbations:
        row = {"W": w, **distances(made[w], features.get(w))}
        row["relative"] = row["pixel_rms"] / unrelated["pixel_rms"] if unrelated["pixel_rms"] > 0 else None
        rows.append(row)
    grid = torch.cat([to_uint8(made[w][:GRID_SEEDS]) for w in made])
    return ({"mix": "sqrt(1 - W^2) n + W n'", "sampler": sampler, "steps": steps, "samples": len(seeds),
             "rows": rows, "unrelated": unrelated, "features": note}, made[0.0], grid)


def nearest_rms(queries: torch.Tensor, pool: torch.Tensor | None, chunk: int = 4096) -> torch.Tensor:
    """Per-pixel RMS distance [Q] from each of queries [Q, C, H, W] (in [-1, 1]) to its nearest image of pool
    (uint8 [N, C, H, W]), or with pool None to its nearest other query."""
    flat = queries.flatten(1).float()  # [Q, D]
    if pool is None:
        dist = torch.cdist(flat, flat).fill_diagonal_(float("inf"))  # [Q, Q]
        return dist.min(dim=1).values / math.sqrt(flat.shape[1])
    best = torch.full((flat.shape[0],), float("inf"))
    for start in range(0, len(pool), chunk):
        part = to_model_space(pool[start:start + chunk]).flatten(1)  # [n, D]
        best = torch.minimum(best, torch.cdist(flat, part).min(dim=1).values)
    return best / math.sqrt(flat.shape[1])


def diversity(samples: torch.Tensor, cfg: Config, held: ImageSet, held_note: str) -> dict[str, Any]:
    """Nearest-neighbour distances of the samples (and of as many held-out images) to the training set and to
    each other; the held-out ones are None when no held-out images exist."""
    train = load_images(cfg.data).images
    real = to_model_space(held.images[:len(samples)])
    own = "training images" in held_note
    return {"samples": len(samples), "training_images": len(train),
            "sample_to_train_rms": float(nearest_rms(samples, train).mean()),
            "sample_to_sample_rms": float(nearest_rms(samples, None).mean()),
            "heldout_to_train_rms": None if own else float(nearest_rms(real, train).mean()),
            "heldout_to_heldout_rms": float(nearest_rms(real, None).mean())}


def analyze_run(run: Run, settings: RunSettings, progress: Progress | None = None) -> tuple[dict[str, Any],
                                                                                            torch.Tensor]:
    """Run mode's numbers for one run, and the uint8 bijectivity grid (one row of GRID_SEEDS per W, W = 0 first)."""
    device = pick_device(settings.device)
    net, cfg, chosen, _ = load_network(run, settings.ckpt, True, device)
    steps_total, done = 3, 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps_total, f"{run.name}: {what}")

    held, note = held_out(cfg)
    say(progress, f"{run.name} @ {chosen.kimg:g} kimg: loss in {settings.bins} noise-level bins on "
                  f"{min(settings.images, len(held))} images ({note}), own pairing and vanilla")
    losses = loss_per_bin(net, cfg, held, settings, device)
    step("loss per bin")
    say(progress, f"{run.name}: bijectivity, {settings.samples} samples at W = 0, "
                  f"{', '.join(f'{w:g}' for w in settings.perturbations)} ({cfg.sample.sampler}, "
                  f"{settings.steps or cfg.sample.steps} steps) and their Inception features")
    bij, samples, grid = bijectivity(net, cfg, settings, device)
    step("bijectivity")
    say(progress, f"{run.name}: diversity, nearest neighbours among the samples and in the training images")
    div = diversity(samples, cfg, held, note)
    step("diversity")
    return ({"label": run.name, "run": str(run.path), "checkpoint_kimg": chosen.kimg, "ema": True,
             "assigner": cfg.assigner.model_dump(), "objective": cfg.objective.kind, "held_out": note,
             "loss_per_bin": losses, "bijectivity": bij, "diversity": div}, grid)
