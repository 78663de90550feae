"""Where networks come from: the device they run on, the configured UNet, and a run's weights from a snapshot."""

from __future__ import annotations

import torch

from . import checkpoint
from .config import Config
from .errors import UserError
from .models.unet import UNet
from .runs import Run


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when available), `cpu` or `cuda` -> a torch.device; UserError when CUDA is asked for but absent."""
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


def load_network(run: Run, ckpt: str | checkpoint.Checkpoint = "latest", ema: bool = True,
                 device: torch.device = torch.device("cpu")) -> tuple[UNet, Config, checkpoint.Checkpoint, dict]:
    """A run's network from one snapshot (`latest`, a kimg, or a Checkpoint already chosen), in eval mode, with the
    run's config, the checkpoint and the snapshot's state."""
    cfg = run.config()
    chosen = ckpt if isinstance(ckpt, checkpoint.Checkpoint) else checkpoint.select(run, ckpt)
    state = checkpoint.load(chosen.path, map_location="cpu")
    net = build_network(cfg)
    net.load_state_dict(state["ema" if ema else "net"])
    return net.to(device).eval().requires_grad_(False), cfg, chosen, state
