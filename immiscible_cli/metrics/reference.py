"""Reference statistics: the key that names them, the cache that keeps them (outside site-packages), clean-fid's
published CIFAR-10 statistics.

Computed statistics of N real images stream through `FeatureStats` and are saved every `SAVE_EVERY` images as a
partial file beside the final one, so an interrupted computation (60k images take about 2 hours on a 2-core CPU)
resumes where it stopped. A lock file serialises processes that want the same statistics: the second one waits
and then reads what the first one wrote.
"""

from __future__ import annotations

import fcntl
import os
import zipfile
import re
import tempfile
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights_sha", self.weights_sha[:12])

    @classmethod
    def for_extractor(cls, dataset: str, split: str, resolution: int, num_images: int,
                      extractor: FIDExtractor) -> "ReferenceKey":
        """The key of statistics made by `extractor` (its mode and weights)."""
        info = extractor.weights
        return cls(dataset, split, resolution, extractor.mode, num_images, info.sha256, info.dtype,
                   extractor.precision)

    def filename(self) -> str:
        """e.g. fashion-mnist_train_32px_clean_n60000_w7ff4a85c3a63-fp32.npz (..._fp16run.npz for features of an
        fp16 network; fp32 adds nothing, so the names of earlier statistics hold)."""
        dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(self.weights_dtype, self.weights_dtype)
        name = (f"{self.dataset}_{self.split}_{self.resolution}px_{self.mode}_n{self.num_images}"
                f"_w{self.weights_sha}-{dtype}" + ("" if self.precision == "fp32" else f"_{self.precision}run"))
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
    cached = _read(path)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(path.parent / f".{path.stem}.lock"):
        cached = _read(path)  # another process may have finished it while this one waited
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
        _save_atomic(path, lambda f: np.savez(f, mu=mu, sigma=sigma, weights_sha256=info.sha256,
                                              weights_source=info.source,
                                              **{field: np.asarray(value) for field, value in asdict(key).items()}))
        partial.unlink(missing_ok=True)
    return mu, sigma


def _read(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as stats:
            return stats["mu"], stats["sigma"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # unreadable: compute again and replace it


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
    with np.load(path) as stats:
        return stats["mu"], stats["sigma"]
