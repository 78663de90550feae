"""FID with clean-fid's pipeline: image batches -> Inception features -> (mu, sigma) -> Frechet distance.

Owns the resize of each clean-fid mode, the feature extractor, the statistics and distances (clean-fid's formulas),
the reference-statistics cache (outside site-packages) and clean-fid's published CIFAR-10 statistics. The network
and its weights live in `inception.py`. On the same images, features and FID equal
`cleanfid.fid.compute_fid(fdir1, fdir2, mode=..., custom_feat_extractor=...)` given the same network.
"""

from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from ..config import cache_root
from .inception import MetricsError, WeightsInfo, load_inception

MODES = ("clean", "legacy_tensorflow")
SIZE = 299
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
CPU_NETWORK_BATCH = 8  # 2-core CPU: 17 images/s at 4-8 per call, 13 at 32


class FIDReferenceError(MetricsError):
    """Reference statistics cannot be obtained."""


# ----------------------------------------------------------------------------------------------------------------
# resize, as clean-fid does it per mode


def _pil_bicubic(plane: np.ndarray) -> np.ndarray:  # uint8 [H, W] -> float32 [299, 299] in [0, 255]
    # clean-fid's "clean" resizer: PIL bicubic on one channel held in float ('F' mode), no quantisation. PIL
    # releases the GIL while resampling, so threads run these in parallel.
    image = Image.fromarray(plane.astype(np.float32))
    return np.asarray(image.resize((SIZE, SIZE), resample=Image.BICUBIC)).clip(0, 255)


def resize_clean(image: np.ndarray) -> np.ndarray:  # uint8 [C, H, W], C = 1 or 3 -> float32 [3, 299, 299]
    """clean-fid's `clean` resize of one image; a grey image is resized once and repeated (clean-fid converts it
    to RGB first, which gives the same three planes)."""
    planes = [_pil_bicubic(plane) for plane in image]
    return np.stack(planes * 3 if len(planes) == 1 else planes)


def resize_legacy_tensorflow(x: torch.Tensor) -> torch.Tensor:  # float32 [B, C, H, W] -> [B, C, 299, 299]
    """The TF-1 bilinear resize (source pixel = target pixel * in / out, edges clamped) that NVIDIA's TorchScript
    applies inside the network in clean-fid's `legacy_tensorflow` mode, op for op (affine grid + grid_sample)."""
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / SIZE
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / SIZE
    theta = theta.to(x.dtype).unsqueeze(0).repeat(batch, 1, 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, [batch, channels, SIZE, SIZE], align_corners=False)  # [B, 299, 299, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------
# features


class FIDExtractor:
    """uint8 image batches -> 2048-d Inception pool features, exactly as clean-fid computes them in `mode`."""

    def __init__(self, mode: str = "clean", device: str | torch.device = "cpu", weights: str | None = None,
                 batch_size: int = 64, *, network: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 info: WeightsInfo | None = None, workers: int | None = None) -> None:
        """`device`: cpu, cuda[:i] or auto. `weights`: a weights file (else the lookup order of
        `inception.weight_candidates`). `batch_size`: images per network call (on the CPU, sub-batches of
        CPU_NETWORK_BATCH). `network` replaces the Inception trunk (tests: any function of the normalised
        [B, 3, 299, 299] input), described by `info`. `workers`: resize threads (default: one per CPU core)."""
        if mode not in MODES:
            raise MetricsError(f"FID mode {mode!r}: expected one of {', '.join(MODES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mode, self.device, self.batch_size = mode, torch.device(device), batch_size
        if network is None:
            self.network, self.weights = load_inception(weights, self.device)
        else:
            self.network, self.weights = network, info or WeightsInfo("custom", "", "custom", "float32")
        self.workers = workers or os.cpu_count() or 1

    def features(self, batches: Iterable[torch.Tensor],
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Features [N, 2048] float64 of uint8 batches [B, C, H, W] (C = 1 or 3, any size); `progress` gets the
        number of images done after each network batch."""
        rows, done = [], 0
        with torch.inference_mode(), ThreadPoolExecutor(self.workers) as pool:
            for images in self._resized(batches, pool):  # float32 [b, 3, 299, 299] in [0, 255]
                x = images.to(self.device, non_blocking=True)
                # (x - 128) / 128 in two steps, as clean-fid's wrapper does: bit-identical input to the network.
                x = (x - 128) / 128
                # On the CPU small batches run faster (cache-resident activations) and give the same bits.
                parts = x.split(CPU_NETWORK_BATCH) if self.device.type == "cpu" else [x]
                features = torch.cat([self.network(part) for part in parts])  # [b, 2048]
                # astype copies: the input buffer is reused, so keep nothing that could alias it.
                rows.append(features.float().cpu().numpy().astype(np.float64))
                done += len(images)
                if progress is not None:
                    progress(done)
        return np.concatenate(rows) if rows else np.zeros((0, 2048))

    def _chunks(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for batch in batches:
            if isinstance(batch, np.ndarray):
                batch = torch.from_numpy(batch)
            if not (isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8 and batch.ndim == 4
                    and batch.shape[1] in (1, 3)):
                got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch)
                raise MetricsError(f"FID input: expected uint8 batches [B, C, H, W] with C = 1 or 3, got {got}")
            yield from batch.split(self.batch_size)

    def _resized(self, batches: Iterable[torch.Tensor], pool: ThreadPoolExecutor) -> Iterator[torch.Tensor]:
        """Resized chunks. Clean mode: the pool resizes chunk i + 1 straight into one of two reused (pinned, on
        CUDA) buffers while the caller runs the network on chunk i from the other."""
        if self.mode == "legacy_tensorflow":
            for chunk in self._chunks(batches):  # uint8 [b, C, H, W]
                # clean-fid hands the network float32 images (ToTensor() * 255 of uint8, which is exact).
                yield resize_legacy_tensorflow(chunk.to(self.device).float().expand(-1, 3, -1, -1))
            return
        buffers: dict[int, torch.Tensor] = {}
        pending: tuple[torch.Tensor, list[Future]] | None = None
        for index, chunk in enumerate(self._chunks(batches)):
            side = index % 2
            if side not in buffers or len(buffers[side]) < len(chunk):
                buffers[side] = torch.empty((len(chunk), 3, SIZE, SIZE), pin_memory=self.device.type == "cuda")
            out = buffers[side][:len(chunk)]  # float32 [b, 3, 299, 299]
            slots = out.numpy()
            jobs = [pool.submit(_resize_into, slots[i], image) for i, image in enumerate(chunk.cpu().numpy())]
            if pending is not None:
                yield _finished(*pending)
            pending = (out, jobs)
        if pending is not None:
            yield _finished(*pending)


def _resize_into(slot: np.ndarray, image: np.ndarray) -> None:  # float32 [3, 299, 299] <- uint8 [C, H, W]
    slot[...] = resize_clean(image)


def _finished(out: torch.Tensor, jobs: list[Future]) -> torch.Tensor:
    for job in jobs:
        job.result()  # re-raises a worker's exception
    return out


# ----------------------------------------------------------------------------------------------------------------
# statistics and distances (clean-fid's formulas)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of features [N, D], N >= 2, as clean-fid: np.mean and np.cov(rowvar=False)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise MetricsError(f"FID statistics need at least 2 feature rows, got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)): clean-fid's `frechet_distance`, with its
    eps * I retry when the product's square root is not finite."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(f"FID statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
                           f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # same result as clean-fid's sqrtm(..., disp=False)[0]
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error leaves a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricsError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrt(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets [N, D] (clean-fid's `fid_from_feats`)."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def compute_kid(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
                max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID (clean-fid's `kernel_distance`: cubic polynomial kernel MMD over random subsets). With the same seed it
    equals clean-fid after `np.random.seed(seed)`; it draws from its own RandomState, not the global one."""
    rng = np.random.RandomState(seed)
    n = features1.shape[1]
    m = min(features1.shape[0], features2.shape[0], max_subset_size)
    total = 0.0
    for _ in range(num_subsets):
        x = features2[rng.choice(features2.shape[0], m, replace=False)]  # [m, D]
        y = features1[rng.choice(features1.shape[0], m, replace=False)]  # [m, D]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3  # [m, m]
        b = (x @ y.T / n + 1) ** 3  # [m, m]
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


# ----------------------------------------------------------------------------------------------------------------
# reference statistics


@dataclass(frozen=True)
class ReferenceKey:
    """Everything reference statistics depend on; FIDs against different keys are not comparable."""

    dataset: str
    split: str
    resolution: int  # pixels, the side of the images fed to the extractor
    mode: str  # clean | legacy_tensorflow
    num_images: int
    weights_sha: str  # first 12 hex digits of the weights file's sha256
    weights_dtype: str  # float32 | float16, as stored

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights_sha", self.weights_sha[:12])

    @classmethod
    def for_extractor(cls, dataset: str, split: str, resolution: int, num_images: int,
                      extractor: FIDExtractor) -> "ReferenceKey":
        """The key of statistics made by `extractor` (its mode and weights)."""
        info = extractor.weights
        return cls(dataset, split, resolution, extractor.mode, num_images, info.sha256, info.dtype)

    def filename(self) -> str:
        """e.g. fashion-mnist_train_32px_clean_n60000_w7ff4a85c3a63-fp32.npz"""
        dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(self.weights_dtype, self.weights_dtype)
        name = (f"{self.dataset}_{self.split}_{self.resolution}px_{self.mode}_n{self.num_images}"
                f"_w{self.weights_sha}-{dtype}")
        return re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".npz"


def reference_stats(key: ReferenceKey, images_fn: Callable[[], Iterable[torch.Tensor]], extractor: FIDExtractor,
                    cache_dir: Path | None = None,
                    progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference images, computed once: cache_dir (default `cache_root()`)/fid-stats/<key>.npz.

    On a hit images_fn is not called. On a miss its batches go through `extractor` and the result is saved
    atomically (temporary file + rename) with the key's fields beside mu and sigma.
    """
    info = extractor.weights
    if (key.mode, key.weights_sha, key.weights_dtype) != (extractor.mode, info.sha256[:12], info.dtype):
        raise MetricsError(f"reference statistics {key.filename()}: the extractor differs (mode {extractor.mode}, "
                           f"weights {info.sha256[:12]} {info.dtype}); build the key with ReferenceKey.for_extractor")
    path = Path(cache_dir or cache_root()) / "fid-stats" / key.filename()
    if path.is_file():
        try:
            with np.load(path) as stats:
                return stats["mu"], stats["sigma"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable: compute again and replace it
    features = extractor.features(images_fn(), progress)
    if len(features) != key.num_images:
        raise MetricsError(f"reference statistics {key.filename()}: got {len(features)} images, the key says "
                           f"{key.num_images}")
    mu, sigma = feature_stats(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, weights_sha256=info.sha256, weights_source=info.source,
                     **{field: np.asarray(value) for field, value in asdict(key).items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return mu, sigma


def cleanfid_reference(split: str, mode: str, cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """clean-fid's published CIFAR-10 statistics (32 px, `split`, `mode`), downloaded once with clean-fid's own
    helper into cache_dir (default `cache_root()`)/cleanfid-stats/."""
    if split not in ("train", "test") or mode not in MODES:
        raise MetricsError(f"clean-fid CIFAR-10 statistics exist for split train|test and mode "
                           f"{'|'.join(MODES)}, not {split!r} / {mode!r}")
    name = f"cifar10_{mode}_{split}_32.npz"  # clean-fid's name: {dataset}_{mode}_{split}_{res}.npz
    folder = Path(cache_dir or cache_root()) / "cleanfid-stats"
    path = folder / name
    if not path.is_file():
        from cleanfid.downloads_helper import check_download_url

        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # so a broken transfer leaves no file behind
                os.replace(check_download_url(local_folder=tmp, url=CLEANFID_STATS_URL + name), path)
        except Exception as e:
            reason = (str(e).splitlines() or [""])[0]
            raise FIDReferenceError(f"clean-fid's CIFAR-10 statistics {name} could not be downloaded "
                                    f"({type(e).__name__}: {reason}); offline, set eval.reference: computed "
                                    f"(statistics from the real images) instead") from None
    with np.load(path) as stats:
        return stats["mu"], stats["sigma"]
