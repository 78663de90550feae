"""Seeded generation: image i depends only on seed i (never on the batch it is generated in), grids, `sample`.

Every image owns a torch.Generator seeded with its seed (edm's StackedRandomGenerator idea): its starting noise
and every stochastic sampler step draw from it, so `--batch 1` and `--batch 256` give the same image for a seed.
Samples pass through the assigner's `decode` (undoing image scaling) before they become pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import assigners, checkpoint
from .config import Config, check_sampler
from .data import to_uint8
from .errors import UserError
from .models.unet import UNet
from .objectives import build_objective
from .runs import Run, write_atomic


class SeededNoise:
    """One generator per image: `randn_like(x)` draws x[i] from generator i (same values at any batch size)."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                            for g in self.generators])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device: unknown device '{name}' (accepted: auto, cpu, cuda)")
    return torch.device(name)


def build_network(cfg: Config) -> UNet:
    """The configured UNet for the configured data (channels, resolution)."""
    return UNet(cfg.model, image_channels=cfg.data.channels, resolution=cfg.data.resolution)


@torch.inference_mode()
def generate(net: torch.nn.Module, cfg: Config, seeds: Sequence[int], *, sampler: str, steps: int,
             guidance: float = 1.0, eta: float | None = None, labels: Sequence[int] | None = None,
             batch: int = 64, device: torch.device | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] images, one per seed, decoded to data space."""
    device = device or next(net.parameters()).device
    objective = build_objective(cfg.objective)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    conditional = cfg.model.num_classes is not None
    out = []
    for start in range(0, len(seeds), batch):
        chunk = list(seeds[start:start + batch])
        noise_source = SeededNoise(chunk, device)
        noise = noise_source.randn_like(torch.empty((len(chunk), *shape), device=device))  # [b, C, H, W]
        chunk_labels = None
        if conditional:
            chunk_labels = torch.tensor([labels[start + i] if labels is not None else s % cfg.model.num_classes
                                         for i, s in enumerate(chunk)], device=device)
        x = objective.sample(net, noise, sampler=sampler, steps=steps,
                             eta=cfg.sample.eta if eta is None else eta, labels=chunk_labels, guidance=guidance,
                             randn=noise_source.randn_like)
        out.append(to_uint8(assigners.decode(x.float(), cfg.assigner)).cpu())
    return torch.cat(out)


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
    import io

    from PIL import Image

    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def parse_seeds(seeds: str | None, num: int | None) -> list[int]:
    """`--seeds 0-63`, `--seeds 1,5,9` or `--num 64` (seeds 0..63) -> list of seeds."""
    if seeds and num:
        raise UserError("give --num or --seeds, not both")
    if not seeds:
        return list(range(num or 64))
    result = []
    try:
        for part in seeds.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                result.extend(range(lo, hi + 1))
            else:
                result.append(int(part))
    except ValueError:
        raise UserError(f"--seeds {seeds}: expected a range A-B (A <= B) or a list like 1,5,9") from None
    if any(s < 0 for s in result):
        raise UserError(f"--seeds {seeds}: seeds must be >= 0")
    return result


def load_network(run: Run, ckpt: str | checkpoint.Checkpoint = "latest", ema: bool = True,
                 device: torch.device = torch.device("cpu")) -> tuple[UNet, Config, checkpoint.Checkpoint, dict]:
    """A run's network from one snapshot (`latest`, a kimg, or a Checkpoint already chosen), in eval mode."""
    cfg = run.config()
    chosen = ckpt if isinstance(ckpt, checkpoint.Checkpoint) else checkpoint.select(run, ckpt)
    state = checkpoint.load(chosen.path, map_location="cpu")
    net = build_network(cfg)
    net.load_state_dict(state["ema" if ema else "net"])
    return net.to(device).eval().requires_grad_(False), cfg, chosen, state


def sample_run(run: Run, *, ckpt: str, seeds: list[int], steps: int | None, sampler: str | None,
               guidance: float | None, label: int | None, batch: int | None, out_dir: Path | None,
               grid: Path | None, ema: bool, device: str) -> list[Path]:
    """`immiscible sample`: images from a run's snapshot as PNG files and/or one grid; returns what it wrote."""
    torch_device = pick_device(device)
    net, cfg, chosen, _ = load_network(run, ckpt, ema, torch_device)
    sampler = sampler or cfg.sample.sampler
    check_sampler(cfg.objective.kind, sampler)
    if label is not None and (cfg.model.num_classes is None or not 0 <= label < cfg.model.num_classes):
        raise UserError(f"--class {label}: " + ("this run is unconditional" if cfg.model.num_classes is None
                        else f"expected 0..{cfg.model.num_classes - 1}"))
    images = generate(net, cfg, seeds, sampler=sampler, steps=steps or cfg.sample.steps,
                      guidance=cfg.sample.guidance if guidance is None else guidance,
                      labels=None if label is None else [label] * len(seeds),
                      batch=batch or cfg.sample.batch_size, device=torch_device)
    written = []
    if out_dir is not None:
        for seed, image in zip(seeds, images):
            path = Path(out_dir) / f"seed{seed:06d}.png"
            save_png(image.permute(1, 2, 0).numpy(), path)
        written.append(Path(out_dir))
    if grid is not None:
        save_png(grid_image(images), Path(grid))
        written.append(Path(grid))
    return written
