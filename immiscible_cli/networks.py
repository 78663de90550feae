"""Where networks come from: the device they run on, the configured UNet, and a run's weights from a snapshot."""

from __future__ import annotations

import os

import torch

from . import checkpoint, distributed, start_noise
from .checkpoint_format import Expected
from .config import Config
from .errors import OutOfMemory, UserError
from .models.unet import UNet
from .runs import Run


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when available), `cpu` or `cuda` -> a torch.device; UserError when CUDA is asked for but absent.
    Under torchrun, CUDA is this process's GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        return distributed.cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device: unknown device '{name}' (accepted: auto, cpu, cuda)")
    return distributed.cuda_device() if name == "cuda" else torch.device(name)


def build_network(cfg: Config) -> UNet:
    """The configured UNet for the configured data (channels, resolution). Counted on the meta device first: a
    network whose weights alone exceed this machine's memory is an OutOfMemory naming model.channels, before
    anything is allocated."""
    if torch.empty(0).device.type != "meta":
        check_network_fits(cfg)
    return UNet(cfg.model, image_channels=cfg.data.channels, resolution=cfg.data.resolution)


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_network_fits(cfg: Config) -> None:
    """OutOfMemory when the configured network's float32 weights are larger than this machine's memory."""
    with torch.device("meta"):
        net = UNet(cfg.model, image_channels=cfg.data.channels, resolution=cfg.data.resolution)
    size = 4 * sum(p.numel() for p in net.parameters())
    memory = host_memory_bytes()
    if memory is not None and size > memory:
        raise OutOfMemory(f"model: the network has {size // 4:,} parameters ({size / 2**30:.1f} GiB of weights), "
                          f"more than this machine's {memory / 2**30:.1f} GiB; lower model.channels (now "
                          f"{cfg.model.channels}) or model.channel_mult")


def expected_snapshot(cfg: Config) -> Expected:
    """What a snapshot of a run with this config must fit: the config and the network's tensor shapes (the network
    is built on the meta device: no memory is allocated)."""
    with torch.device("meta"):
        net = build_network(cfg)
    return Expected(cfg, {name: tuple(t.shape) for name, t in net.state_dict().items()},
                    tuple(tuple(p.shape) for p in net.parameters()))


def load_network(run: Run, ckpt: str | checkpoint.Checkpoint = "latest", ema: bool = True,
                 device: torch.device = torch.device("cpu")) -> tuple[UNet, Config, checkpoint.Checkpoint, dict]:
    """A run's network from one snapshot (`latest`, a kimg, or a Checkpoint already chosen), in eval mode, with the
    run's config, the checkpoint and the snapshot's state. A snapshot that is unreadable or does not fit config.yaml
    is a CheckpointError naming the problem and the run's snapshots that do fit (to pass as --ckpt)."""
    cfg = run.config()
    chosen = ckpt if isinstance(ckpt, checkpoint.Checkpoint) else checkpoint.select(run, ckpt)
    expected = expected_snapshot(cfg)
    try:
        state = checkpoint.load(chosen.path, "cpu", expected)
    except checkpoint.CheckpointError as e:
        others = checkpoint.usable(run, expected, exclude=chosen.path)
        hint = (f"usable checkpoints of this run: {', '.join(f'{c.kimg:g}' for c in others)} (pass one as "
                f"--ckpt KIMG)" if others else "no other checkpoint of this run fits config.yaml")
        raise checkpoint.CheckpointError(f"{e}; {hint}") from None
    if not ema and "net" not in state:
        raise checkpoint.CheckpointError(f"{chosen.path}: a kept network holds the EMA weights only; drop --raw")
    net = build_network(cfg)
    net.load_state_dict(state["ema" if ema else "net"])
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    start_noise.attach(net, start_noise.NoiseMoments.from_state(state.get("noise_moments"), shape, device))
    return net.to(device).eval().requires_grad_(False), cfg, chosen, state
