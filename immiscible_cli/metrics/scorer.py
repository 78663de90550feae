"""An FID point: generate with fixed per-image seeds, stream the images through the extractor, score them against
the reference statistics; and the fid.jsonl row that carries the number with every setting that makes two FIDs
comparable (`runs.FID_SETTINGS`).

`FIDScorer` is built by the command (`train` hands it to the trainer, which calls `score` on its EMA network every
eval.every_kimg; `eval` calls it on checkpoints). Generated images never pile up: each batch is sampled, resized
and turned into features that only update running sums, so 50k images cost the memory of one batch and one
[2048, 2048] matrix (features are kept only for KID). Under torchrun every rank makes its share of the batches
and the sums are reduced (metrics/shards.py); rank 0 computes the distance, and every rank returns the row.

The fid.jsonl row, its settings, reader and writer are the run directory's (runs.py); `sampling_settings` here
fills its `sampling` field.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import distributed, start_noise, vae
from ..config import Config, ConfigError, SampleConfig, check_sampler
from ..console import Progress, note as _note
from ..data import load_images
from ..datasets import SOURCES
from ..generation import generate
from ..objectives import OBJECTIVES, sampler_settings
from ..latents import LatentHeader, training_header
from .features import FIDExtractor
from . import shards
from .reference import ReferenceKey, cleanfid_reference, reference_stats
from .stats import FeatureStats, compute_kid, frechet_distance_eigh

REFERENCE_SEED = 0  # the subset of real images behind `eval.reference_images` is a fixed seeded draw


class FIDScorer:
    """FID of a network of one run config against that config's reference statistics. A run on latents (`latent`:
    its header) is scored on its decoded images against the images the latents were encoded from, and its rows
    record the decoder."""

    def __init__(self, cfg: Config, device: torch.device, *, inception: Path | str | None = None,
                 progress: Progress | None = None, num_images: int | None = None, sampler: str | None = None,
                 steps: int | None = None, reference: str | None = None, mode: str | None = None,
                 batch: int | None = None, kid: bool = False, extractor: FIDExtractor | None = None,
                 reference_images: int | None = None, latent: LatentHeader | None = None):
        e = cfg.eval
        self.cfg, self.device, self.kid = cfg, device, kid
        self.latent = latent
        self.image_data = latent.source_data() if latent is not None else cfg.data  # the real images
        self.num_images = num_images or e.num_images
        self.sampler, self.steps = sampler or e.sampler, steps or e.steps
        self.reference, self.mode = reference or e.reference, mode or e.mode
        self.batch = batch or e.batch_size
        self.reference_images = reference_images or e.reference_images
        check_sampler(cfg.objective.kind, self.sampler)
        if self.reference not in ("computed", "cleanfid"):
            raise ConfigError(f"reference '{self.reference}': expected computed or cleanfid")
        if kid and self.reference == "cleanfid":
            raise ConfigError("--kid: needs the reference images, which clean-fid's published statistics do not "
                              "include; use --reference computed")
        self.extractor = extractor or FIDExtractor(self.mode, device, weights=inception, batch_size=self.batch,
                                                   precision=inception_precision(e.inception_precision, device))
        self._real_batches: Callable[[], Iterator[torch.Tensor]] | None = None  # the reference images, for KID
        self._real_features = None
        self.kept: torch.Tensor | None = None  # the first images of the last point, when score() was asked to keep
        self.ref_mu, self.ref_sigma, self.ref_info = self._reference(progress)

    def _reference(self, progress: Progress | None):
        data, e = self.image_data, self.cfg.eval
        if self.reference == "cleanfid":
            if data.source != "cifar10" or data.resolution != 32:
                raise ConfigError("eval.reference: clean-fid's published statistics exist for CIFAR-10 at 32 px "
                                  "only; use eval.reference=computed")
            mu, sigma = cleanfid_reference(e.reference_split, self.mode)
            count = 50_000 if e.reference_split == "train" else 10_000
            return mu, sigma, {"name": "cleanfid-cifar10", "split": e.reference_split, "num_images": count,
                               "mode": self.mode}
        split = e.reference_split
        if data.source in SOURCES and split not in SOURCES[data.source].splits:  # latents: load_images reads the file
            raise ConfigError(f"eval.reference_split: the {data.source} source has one split; use train")
        _note(progress, f"FID reference: reading the {data.source} images ({split} split)")
        real = load_images(data.model_copy(update={"max_images": None}), split)  # the whole split, not a subset
        total = len(real)
        count = min(self.reference_images or total, total)
        chosen = real.images
        if count < total:
            pick = torch.randperm(total, generator=torch.Generator().manual_seed(REFERENCE_SEED))[:count]
            chosen = chosen[pick.sort().values]
        # keyed by the images actually used: two folders of one name, pad or resize, grey or colour differ
        key = ReferenceKey.for_extractor(real.name, split, data.resolution, count, self.extractor, chosen,
                                         data.source)

        def images() -> Iterator[torch.Tensor]:
            return iter(chosen.split(self.batch))

        self._real_batches = images
        report = (lambda done: progress(done, count, "reference statistics")) if progress else None

        def started(path: Path, resumed: int) -> None:
            _note(progress, f"reference statistics: {count} {real.name} {split} images through the Inception network "
                            f"({self.mode}), once, cached as {path}" + (f"; resuming at {resumed}" if resumed else ""))
            if report is not None:
                report(resumed)  # the bar starts with the phase (its tenths count from here)

        mu, sigma = reference_stats(key, images, self.extractor, progress=report, started=started)
        return mu, sigma, {"name": real.name, "split": split, "num_images": count, "mode": self.mode,
                           "resolution": data.resolution, "file": key.filename()}

    def settings(self, ema: bool = True) -> dict[str, Any]:
        """The part of a row that must match for FIDs to be comparable (FID_SETTINGS; a latent run's `decoder`)."""
        w = self.extractor.weights
        return {"num_images": self.num_images, "mode": self.mode, "reference": self.ref_info,
                "sampler": self.sampler, "steps": self.steps, "guidance": self.cfg.sample.guidance,
                "sampling": {**sampling_settings(self.cfg, self.sampler), "precision": self.cfg.eval.precision},
                "ema": ema, "weights": {"source": w.source, "sha256": w.sha256, "dtype": w.dtype},
                "inception_precision": self.extractor.precision,
                **({"decoder": self.latent.vae.setting()} if self.latent is not None else {})}

    def generated(self, net: torch.nn.Module, nfe: list[int]) -> Iterator[torch.Tensor]:
        """uint8 batches of the num_images generated images (seeds 0..N-1), made one batch at a time; the network
        evaluations of each batch are appended to `nfe`."""
        for first in shards.batch_starts(self.num_images, self.batch):  # several processes: this rank's batches
            seeds = list(range(first, min(first + self.batch, self.num_images)))
            yield generate(net, self.cfg, seeds, sampler=self.sampler, steps=self.steps,
                           guidance=self.cfg.sample.guidance, batch=self.batch, device=self.device, nfe=nfe,
                           precision=self.cfg.eval.precision)

    def shares_grid(self, sample: SampleConfig) -> bool:
        """Whether a snapshot grid (sample.grid_size images of seeds 0, 1, ...) is the first images of this scorer's
        FID point, so that a point scored at a snapshot can hand its images to the grid instead of sampling them
        again: the same sampler, steps and precision (fp32, as the grid samples), a sampler whose images do not
        depend on the batch (not one of the objective's `batch_dependent_samplers`: dopri5), and one process (with
        several, rank 0 does not make seeds 0..N-1)."""
        return (self.sampler == sample.sampler and self.steps == sample.steps and self.cfg.eval.precision == "fp32"
                and self.sampler not in OBJECTIVES[self.cfg.objective.kind].batch_dependent_samplers
                and sample.grid_size <= self.num_images and distributed.world() == 1)

    def score(self, net: torch.nn.Module, *, kimg: float, step: int, train_s: float, ema: bool = True,
              progress: Progress | None = None, keep: int = 0) -> dict[str, Any]:
        """Generate num_images with `net` and score them; the fid.jsonl row. `keep`: the first `keep` generated
        images (uint8) stay in `self.kept` for the caller (the snapshot grid, see shares_grid)."""
        start_noise.check_available(self.cfg.sample.start, start_noise.attached(net), f"FID at {kimg:g} kimg")
        start = time.perf_counter()
        was_training = net.training
        net.eval()
        world = distributed.world()  # each rank counts its own images: shown as all ranks' share
        report = (lambda done: progress(min(done * world, self.num_images), self.num_images, "FID")) \
            if progress else None
        nfe: list[int] = []
        _note(progress, f"FID at {kimg:g} kimg: generating {self.num_images} images ({self.sampler}, {self.steps} "
                        f"steps) and scoring them")
        if report is not None:
            report(0)
        kept: list[torch.Tensor] = []

        def generated() -> Iterator[torch.Tensor]:
            wanted = keep
            for images in self.generated(net, nfe):
                if wanted > 0:
                    kept.append(images[:wanted].clone())
                    wanted -= len(kept[-1])
                yield images

        try:
            stats = self.extractor.stats(generated(), report, keep_features=self.kid)
            self.kept = torch.cat(kept) if kept else None
        finally:
            net.train(was_training)
        stats, nfe = shards.combine(stats, nfe, self.num_images, self.batch, self.device)

        def scored() -> dict[str, Any]:  # rank 0 computes the distance; every rank returns its row
            where = self.device if self.device.type == "cuda" else "cpu"  # float64 eigenproblems: CUDA or the CPU
            fid = frechet_distance_eigh(*stats.mean_cov(), self.ref_mu, self.ref_sigma, device=where)
            row = {"kimg": round(kimg, 6), "step": step, "fid": fid, **self.settings(ema), "frechet": "eigh",
                   "nfe": sum(nfe) / len(nfe)}
            if self.kid:
                row["kid"] = self._kid(stats)
            if self.cfg.sample.start == "matched":  # the fitted start itself (it grows with training)
                row["start_moments"] = start_noise.attached(net).summary()
            if vae.attached(net) is not None:  # where the decoder was read (not a setting: the folder may move)
                row["decoder_path"] = vae.attached(net).identity.path
            return row

        row = distributed.on_main(scored)
        return {**row, "seconds": time.perf_counter() - start, "train_s": train_s, "time": time.time()}

    def _kid(self, stats: FeatureStats) -> float:
        """KID needs the reference features themselves, not just (mu, sigma): computed once per scorer."""
        if self._real_features is None:
            self._real_features = self.extractor.features(self._real_batches())
        return compute_kid(stats.features(), self._real_features)


def sampling_settings(cfg: Config, sampler: str) -> dict[str, Any]:
    """The sampling fields besides sampler, steps and guidance that change the images: every objective's sampler
    fields, those the sampler uses and null for the others (objectives.sampler_settings: so changing, say, eta does
    not split a flow run's FID curve), then the start noise's (image_scale is the method's, in config.yaml)."""
    s = cfg.sample
    return {**sampler_settings(cfg.objective.kind, s, sampler), "noise": s.noise, "start_std": s.start_std,
            "start": s.start}


def inception_precision(wanted: str, device: torch.device) -> str:
    """eval.inception_precision where it applies: CUDA; the CPU always runs the Inception network in fp32."""
    return wanted if torch.device(device).type == "cuda" else "fp32"


def training_scorer(cfg: Config, device: torch.device, *, inception: Path | str | None = None,
                    progress: Progress | None = None) -> FIDScorer | None:
    """The scorer `train` hands to the trainer: None when the run is too short for any FID point (then no weights
    or reference statistics are needed)."""
    if not 0 < cfg.eval.every_kimg <= cfg.train.total_kimg:
        return None
    return FIDScorer(cfg, device, inception=inception, progress=progress, latent=training_header(cfg))
