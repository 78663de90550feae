"""Reference statistics: the key that names them, the cache that keeps them (outside site-packages), clean-fid's
published CIFAR-10 statistics.

Computed statistics of N real images stream through `FeatureStats` and are saved every `SAVE_EVERY` images as a
partial file beside the final one, so an interrupted computation (60k images take about 2 hours on a 2-core CPU)
resumes where it stopped. A lock file serialises processes that want the same statistics: the second one waits
and then reads what the first one wrote.

Statistics are keyed by their content: `ReferenceKey.content` is the sha256 of the reference images actually used
(after channels, fit, resolution and the subset), stored in the file, and part of its name (`_d<12 hex>`) for an
image folder or a named dataset not at its native shape (`NATIVE_SHAPES`); a named dataset at its native shape keeps
the name it always had, so statistics cached before content keys (and committed ones) stay usable. Every file
stores `stats_sha256`, a checksum of mu and sigma; a read checks it, the shapes, finiteness and the stored key
fields (`_check`). A file that fails is reported on stderr and computed again (a file from before checksums, which
has none, is accepted when the rest holds and its name carries no content digest).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..cache import cache_root
from .features import MODES, FIDExtractor
from ..errors import MetricsError
from .stats import FeatureStats

CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
SAVE_EVERY = 2000  # images between two saves of the partial sums
# [C, H, W] of the named datasets as shipped: at this shape their images are fixed by the name (no fit, no channel
# change), so their statistics keep a name without a content digest
NATIVE_SHAPES = {"embedded": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


class FIDReferenceError(MetricsError):
    """Reference statistics cannot be obtained."""


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
    precision: str = "fp32"  # the network's dtype when the features were made: fp32 | fp16 | bf16
    content: str = ""  # sha256 of the reference images' uint8 bytes [N, C, H, W] ("" unknown: not checked)
    content_in_name: bool = False  # an image folder, or a named dataset changed by fit / channels / resolution

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights_sha", self.weights_sha[:12])

    @classmethod
    def for_extractor(cls, dataset: str, split: str, resolution: int, num_images: int,
                      extractor: FIDExtractor, images: torch.Tensor | None = None,
                      source: str | None = None) -> "ReferenceKey":
        """The key of statistics made by `extractor` (its mode and weights) from `images` (uint8 [N, C, H, W], the
        ones actually used) of data source `source`: their digest is the key's content."""
        info = extractor.weights
        content, in_name = "", False
        if images is not None:
            content = images_digest(images)
            in_name = NATIVE_SHAPES.get(source or dataset) != tuple(images.shape[1:])
        return cls(dataset, split, resolution, extractor.mode, num_images, info.sha256, info.dtype,
                   extractor.precision, content, in_name)

    def filename(self) -> str:
        """e.g. fashion-mnist_train_32px_clean_n60000_w7ff4a85c3a63-fp32.npz (..._fp16run.npz for features of an
        fp16 network; fp32 adds nothing, so the names of earlier statistics hold)."""
        dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(self.weights_dtype, self.weights_dtype)
        name = (f"{self.dataset}_{self.split}_{self.resolution}px_{self.mode}_n{self.num_images}"
                f"_w{self.weights_sha}-{dtype}" + ("" if self.precision == "fp32" else f"_{self.precision}run")
                + (f"_d{self.content[:12]}" if self.content_in_name else ""))
        return re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".npz"


def reference_stats(key: ReferenceKey, images_fn: Callable[[], Iterable[torch.Tensor]], extractor: FIDExtractor,
                    cache_dir: Path | None = None,
                    progress: Callable[[int], None] | None = None,
                    started: Callable[[Path, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference images, computed once: cache_dir (default `cache_root()`)/fid-stats/<key>.npz.

    On a hit images_fn is not called. On a miss its batches (always the same images in the same order) stream
    through `extractor`, resuming from a partial file when an earlier computation was interrupted, and the result
    is saved atomically with the key's fields beside mu and sigma. `started(path, resumed_images)` is called when a
    computation begins (not on a hit), `progress(images_done)` after each network batch.
    """
    info = extractor.weights
    if (key.mode, key.weights_sha, key.weights_dtype, key.precision) != (extractor.mode, info.sha256[:12],
                                                                         info.dtype, extractor.precision):
        raise MetricsError(f"reference statistics {key.filename()}: the extractor differs (mode {extractor.mode}, "
                           f"weights {info.sha256[:12]} {info.dtype}, {extractor.precision}); build the key with "
                           f"ReferenceKey.for_extractor")
    path = Path(cache_dir or cache_root()) / "fid-stats" / key.filename()
    cached = _read(path, key)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(path.parent / f".{path.stem}.lock"):
        cached = _read(path, key, warn=False)  # another process may have finished it while this one waited
        if cached is not None:
            return cached
        partial = path.with_name(f"{path.stem}.partial.npz")
        stats = _read_partial(partial)
        saved_at = stats.count
        if started is not None:
            started(path, stats.count)
        for features in extractor.iter_features(_skip(images_fn(), stats.count)):
            stats.update(features)
            if progress is not None:
                progress(stats.count)
            if stats.count - saved_at >= SAVE_EVERY and stats.count < key.num_images:
                _save_atomic(partial, stats.save)
                saved_at = stats.count
        if stats.count != key.num_images:
            raise MetricsError(f"reference statistics {key.filename()}: got {stats.count} images, the key says "
                               f"{key.num_images}")
        mu, sigma = stats.mean_cov()
        _save_atomic(path, lambda f: np.savez(f, mu=mu, sigma=sigma, stats_sha256=stats_digest(mu, sigma),
                                              weights_sha256=info.sha256,
                                              weights_source=info.source,
                                              **{field: np.asarray(value) for field, value in asdict(key).items()}))
        partial.unlink(missing_ok=True)
    return mu, sigma


def images_digest(images: torch.Tensor) -> str:
    """sha256 (hex) of uint8 images [N, C, H, W] as laid out in memory, shape included."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def stats_digest(mu: np.ndarray, sigma: np.ndarray) -> str:
    """sha256 (hex) of mu and sigma as float64: the checksum stored with computed statistics."""
    digest = hashlib.sha256()
    for array in (mu, sigma):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


def check_stats(mu: np.ndarray, sigma: np.ndarray) -> str | None:
    """What is wrong with (mu, sigma) as FID statistics (shapes [D] and [D, D], finite numbers); None when fine."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not mu.shape[0]:
        return f"mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]"
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        return "mu or sigma is not numeric"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "mu or sigma holds NaN or infinity"
    return None


def _check(stats, key: ReferenceKey) -> tuple[tuple[np.ndarray, np.ndarray] | None, str | None]:
    """(mu, sigma) of an opened statistics file, or (None, what is wrong): shapes, finiteness, the checksum (required
    in files named by content), the images' digest and the stored key fields."""
    mu, sigma = np.asarray(stats["mu"]), np.asarray(stats["sigma"])
    problem = check_stats(mu, sigma)
    if problem:
        return None, problem
    if "stats_sha256" in stats.files:
        if str(stats["stats_sha256"]) != stats_digest(mu, sigma):
            return None, "mu and sigma do not match their stored checksum (stats_sha256)"
    elif key.content_in_name:
        return None, "it has no checksum (stats_sha256)"
    for field, value in asdict(key).items():
        if field in stats.files and field != "content_in_name" and value != "" and str(stats[field]) != str(value):
            return None, f"its {field} is {str(stats[field])[:16]!r}, expected {str(value)[:16]!r}"
    return (mu, sigma), None


def _read(path: Path, key: ReferenceKey, warn: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """The statistics cached at `path`, checked (`_check`); None when absent or when they fail (reported on stderr
    with `warn`): the caller computes them again and replaces the file."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as stats:
            found, problem = _check(stats, key)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        found, problem = None, f"unreadable ({type(e).__name__})"
    if problem and warn:
        print(f"warning: {path}: {problem}; computing the reference statistics again", file=sys.stderr)
    return found


def _read_partial(path: Path) -> FeatureStats:
    if path.is_file():
        try:
            return FeatureStats.load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged: start over
    return FeatureStats()


def _skip(batches: Iterable[torch.Tensor], count: int) -> Iterator[torch.Tensor]:
    """The batches without their first `count` images (those already in the partial sums)."""
    for batch in batches:
        if count >= len(batch):
            count -= len(batch)
            continue
        yield batch[count:]
        count = 0


def _save_atomic(path: Path, write: Callable) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is for every user of the machine to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Lock:
    """An exclusive flock held while statistics are computed; released by the OS if the process dies."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "_Lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # waits for another process computing the same statistics
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


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
    try:
        with np.load(path) as stats:
            mu, sigma = np.asarray(stats["mu"]), np.asarray(stats["sigma"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        mu, sigma, problem = None, None, f"unreadable ({type(e).__name__})"
    else:
        problem = check_stats(mu, sigma)
    if problem:
        raise FIDReferenceError(f"{path}: {problem}; delete it to download clean-fid's statistics again")
    return mu, sigma
