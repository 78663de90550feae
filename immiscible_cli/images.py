"""Writing images: uint8 [N, C, H, W] batches as one square grid or as PNG files, atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from .files import write_atomic


def grid_image(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, C, H, W] -> one [rows*H, cols*W, C] array, as square as possible (1-pixel-free tiling)."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros((rows * cols, c, h, w), dtype=torch.uint8)
    canvas[:n] = images
    canvas = canvas.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return canvas.numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a [H, W, C] uint8 array as PNG, atomically."""
    from PIL import Image

    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def save_each(images: torch.Tensor, names: list[str], folder: Path) -> None:
    """One PNG per image of uint8 [N, C, H, W], named by `names`, in `folder`."""
    for name, image in zip(names, images):
        save_png(image.permute(1, 2, 0).numpy(), Path(folder) / name)
