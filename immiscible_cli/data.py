"""The data pipeline: a source (datasets.py) to an `ImageSet` at the training resolution, and a seeded batch
stream in [-1, 1].

Every source gives an `ImageSet` (uint8 [N, C, H, W] at the configured resolution and channel count, labels int64
[N]: the dataset's own classes; an imagefolder image outside every class sub-folder is unlabelled, -1; a latents
file gives float latents in model space, latents.py); `check_classes` holds a conditional model's num_classes
against them. `BatchStream` turns it into training batches: an epoch-seeded permutation, random flips from the
training generator, float in [-1, 1], on the GPU without host copies when the set is resident there.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from .datasets import SOURCES, DataError, ImageSet
from .latents import load_latent_set

__all__ = ["BatchStream", "DataError", "ImageSet", "check_classes", "fit_resolution", "fits_on_gpu", "load_images",
           "match_channels", "mean_image", "tensor_digest", "to_model_space", "to_uint8"]


# ------------------------------------------------------------------------------------------------------------------
# one entry point


def load_images(cfg: DataConfig, split: str | None = None) -> ImageSet:
    """The configured source as uint8 [N, C, H, W] at cfg.resolution with cfg.channels channels (latents: float
    [N, C, h, w] from the file, checked against both)."""
    if cfg.source == "latents":
        return load_latent_set(cfg)
    source = SOURCES[cfg.source]
    images, labels, num_classes = source.read(cfg, split or cfg.split)
    if cfg.max_images is not None:
        images, labels = images[:cfg.max_images], labels[:cfg.max_images]
    tensor = torch.from_numpy(np.array(images, np.uint8))  # a writable copy (idx arrays are read-only views)
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)  # [N, C, H, W]
    tensor = fit_resolution(match_channels(tensor, cfg.channels), cfg.resolution, cfg.fit)
    return ImageSet(tensor.contiguous(), torch.from_numpy(np.asarray(labels, np.int64)), num_classes,
                    source.name(cfg))


def check_classes(data: ImageSet, num_classes: int | None) -> None:
    """DataError unless a conditional model (`num_classes` not None) has a class for every label of `data`, and
    every image has one."""
    if num_classes is None:
        return
    if data.num_classes == 0:
        raise DataError(f"model.num_classes: {num_classes} classes, but {data.name} has none (an imagefolder takes "
                        f"its classes from the sub-folders of data.root); sort the images into one sub-folder per "
                        f"class, or set model.num_classes=null")
    unlabelled = int((data.labels < 0).sum())
    if unlabelled:
        raise DataError(f"model.num_classes: {unlabelled} images of {data.name} lie directly in data.root, outside "
                        f"the class sub-folders; move them into one, or set model.num_classes=null")
    top = int(data.labels.max())
    if top >= num_classes:
        raise DataError(f"model.num_classes: {num_classes}, but {data.name} has labels up to {top}; set "
                        f"model.num_classes={max(top + 1, data.num_classes)}")


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition; RGB -> grey by ITU-R 601 luma (what PIL's convert('L') does)."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1)
    weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
    return ((images.to(torch.int32) * weights).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)


def fit_resolution(images: torch.Tensor, resolution: int, fit: str) -> torch.Tensor:
    """uint8 [N, C, h, w] -> [N, C, resolution, resolution]: zero-pad (then centre-crop) or bicubic resize."""
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    if fit == "resize":
        out = F.interpolate(images.float(), size=(resolution, resolution), mode="bicubic", antialias=True,
                            align_corners=False)
        return out.round().clamp(0, 255).to(torch.uint8)
    pad_h, pad_w = max(resolution - h, 0), max(resolution - w, 0)
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))  # 0 = black = -1
    top, left = (images.shape[-2] - resolution) // 2, (images.shape[-1] - resolution) // 2
    return images[..., top:top + resolution, left:left + resolution]


# ------------------------------------------------------------------------------------------------------------------
# training batches


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]; float latents are in model space already (float32, values kept)."""
    if images.is_floating_point():
        return images.to(torch.float32)
    return images.to(torch.float32) / 127.5 - 1.0


MEAN_IMAGE_CAP = 50_000
"""Images behind `mean_image` at most: larger sets use a seeded sample of this many (the same on every rank)."""


def mean_image(data: ImageSet, hflip: bool, cap: int = MEAN_IMAGE_CAP) -> torch.Tensor:
    """The training distribution's mean image [C, H, W] in model space, float32 on the CPU: the mean of the images
    in [-1, 1] (of a seeded sample of `cap` of them for larger sets), averaged with its mirror image when training
    flips (random flips make the distribution mirror-symmetric). Accumulated in float64, in a fixed order, so every
    process and every run on the same data gets the same bits."""
    images = data.images
    if len(images) > cap:
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:cap].sort().values
        images = images[chosen]
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    for start in range(0, len(images), 4096):
        total += images[start:start + 4096].to(torch.float64).sum(dim=0)
    scale, offset = (1.0, 0.0) if images.is_floating_point() else (127.5, 1.0)  # latents: model space already
    mean = total / (scale * len(images)) - offset
    if hflip:
        mean = (mean + mean.flip(-1)) / 2
    return mean.to(torch.float32)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of a tensor's bytes on the CPU: names a mean image in meta.json and logs."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (rounded), the inverse of to_model_space up to quantisation."""
    return ((samples.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


class BatchStream:
    """Endless seeded batches: a fresh permutation per epoch (seeded by seed and epoch, so the data position is two
    integers), flips drawn from the caller's generator. Batches are float [-1, 1] on `device`.

    The set lives on the GPU when `resident` (no host copy per step); otherwise batches are gathered on the CPU and
    copied (pinned, non-blocking). With `rows` (one process of several), every batch_size-image batch is drawn
    whole (order and flips) and only its rows `rows` are gathered and returned: the processes share it."""

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device, seed: int, hflip: bool,
                 resident: bool, rows: slice | None = None):
        self.batch_size, self.device, self.seed, self.hflip, self.rows = batch_size, device, seed, hflip, rows
        self.storage = device if resident else torch.device("cpu")
        self.images = data.images.to(self.storage)
        self.labels = data.labels.to(self.storage)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=generator).to(self.storage)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)

    def next(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, C, H, W] float in [-1, 1], [B] labels) on self.device; flips come from `generator`."""
        pieces = []
        needed = self.batch_size
        while needed:
            take = min(needed, len(self._order) - self.position)
            pieces.append(self._order[self.position:self.position + take])
            self.position += take
            needed -= take
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        index = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self.rows is not None:
            index = index[self.rows]
        images, labels = self.images[index], self.labels[index]
        if self.storage != self.device:  # pinned first: a non_blocking copy from pageable memory would block
            pinned = self.device.type == "cuda"
            images = (images.pin_memory() if pinned else images).to(self.device, non_blocking=pinned)
            labels = (labels.pin_memory() if pinned else labels).to(self.device, non_blocking=pinned)
        x = to_model_space(images)  # [B, C, H, W]
        if self.hflip:
            flip = torch.rand(self.batch_size, generator=generator, device=generator.device) < 0.5  # [B]
            if self.rows is not None:
                flip = flip[self.rows]
            x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x, labels


def fits_on_gpu(data: ImageSet, device: torch.device) -> bool:
    """True when the set (uint8 images, or float latents) takes under a quarter of the GPU's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return data.images.numel() * data.images.element_size() < free // 4
