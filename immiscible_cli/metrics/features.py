"""FID features with clean-fid's pipeline: uint8 image batches -> resize of each clean-fid mode -> Inception pool
features [b, 2048], streamed batch by batch.

On the same images and network, features equal what `cleanfid.fid.compute_fid(..., custom_feat_extractor=...)`
computes: bit for bit with the default memory layout; on the CPU the trunk runs in channels_last, 1.6x faster on a
2-core machine and equal to about 1e-6 relative. Statistics live in `stats.py`, the reference cache in
`reference.py`, the network in `inception.py`, its weights in `weights.py`.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import MetricsError
from .weights import WeightsInfo, load_inception
from .stats import FeatureStats

MODES = ("clean", "legacy_tensorflow")
SIZE = 299
CPU_NETWORK_BATCH = 8  # 2-core CPU, channels_last: 7.6 images/s at 8 per call, 6.8 at 4, 5.8 at 16
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
                 info: WeightsInfo | None = None, workers: int | None = None, precision: str = "fp32") -> None:
        """`device`: cpu, cuda[:i] or auto. `weights`: a weights file (else the lookup order of
        `weights.weight_candidates`). `batch_size`: images per network call (on the CPU, sub-batches of
        CPU_NETWORK_BATCH). `network` replaces the Inception trunk (tests: any function of the normalised
        [B, 3, 299, 299] input), described by `info`. `workers`: resize threads (default: one per CPU core).
        `precision`: the network's dtype (fp32, fp16 or bf16; features come back float64 either way)."""
        if mode not in MODES:
            raise MetricsError(f"FID mode {mode!r}: expected one of {', '.join(MODES)}")
        if precision not in PRECISIONS:
            raise MetricsError(f"Inception precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.precision, self.dtype = precision, PRECISIONS[precision]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mode, self.device, self.batch_size = mode, torch.device(device), batch_size
        # oneDNN runs 1.6x faster on NHWC; so do tensor cores in half precision (fp32 on CUDA keeps NCHW)
        self.channels_last = network is None and (self.device.type == "cpu" or precision != "fp32")
        if network is None:
            self.network, self.weights = load_inception(weights, self.device)
            self.network = self.network.to(self.dtype)
            if self.channels_last:
                self.network = self.network.to(memory_format=torch.channels_last)
        else:
            self.network, self.weights = network, info or WeightsInfo("custom", "", "custom", "float32")
        self.workers = workers or os.cpu_count() or 1

    def iter_features(self, batches: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
        """Features [b, 2048] float64, one array per network batch, of uint8 batches [B, C, H, W] (C = 1 or 3, any
        size). Nothing is kept: the caller streams them into statistics."""
        with torch.inference_mode(), ThreadPoolExecutor(self.workers) as pool:
            for images in self._resized(batches, pool):  # float32 [b, 3, 299, 299] in [0, 255]
                x = images.to(self.device, non_blocking=True)
                # (x - 128) / 128 in two steps, as clean-fid's wrapper does: bit-identical input to the network.
                x = ((x - 128) / 128).to(self.dtype)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                # On the CPU small batches run faster (cache-resident activations).
                parts = x.split(CPU_NETWORK_BATCH) if self.device.type == "cpu" else [x]
                features = torch.cat([self.network(part) for part in parts])  # [b, 2048]
                # astype copies: the input buffer is reused, so keep nothing that could alias it.
                yield features.float().cpu().numpy().astype(np.float64)

    def stats(self, batches: Iterable[torch.Tensor], progress: Callable[[int], None] | None = None, *,
              into: FeatureStats | None = None, keep_features: bool = False) -> FeatureStats:
        """Streaming statistics of the batches' features (added to `into` when given); `progress` gets the number
        of images counted so far after each network batch."""
        stats = into if into is not None else FeatureStats(keep_features=keep_features)
        for features in self.iter_features(batches):
            stats.update(features)
            if progress is not None:
                progress(stats.count)
        return stats

    def features(self, batches: Iterable[torch.Tensor],
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Features [N, 2048] float64 of uint8 batches, all held in memory (tests, KID's reference set)."""
        rows, done = [], 0
        for features in self.iter_features(batches):
            rows.append(features)
            done += len(features)
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
