"""Seeded generation, the kernel every image maker calls (`sample`, FID points, snapshot grids, in-painting,
analysis): image i depends only on seed i, never on the batch it is generated in.

Every image owns a torch.Generator seeded with its seed (edm's StackedRandomGenerator idea): its starting noise
and every stochastic sampler step draw from it, so `--batch 1` and `--batch 256` give the same image for a seed.
Samples pass through the assigner's `decode` (undoing image scaling) before they become pixels; a latent run's
samples then through the VAE its network carries (vae.attach), batch by batch, clipped to [-1, 1]. This module
knows no run directory and no command: metrics, the trainer, editing and analysis import it, not the other way round.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from . import assigners, start_noise, vae
from .config import Config
from .counter_noise import CounterNoise
from .data import to_uint8
from .objectives import build_objective


class SeededNoise:
    """One generator per image: `randn_like(x)` draws x[i] from generator i (same values at any batch size)."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                            for g in self.generators])


class CountingNet(torch.nn.Module):
    """Forwards to `net` and counts the calls (network function evaluations, NFE) since the last `reset`.

    A guided prediction is one call (conditional and unconditional halves share one forward). `num_classes` is
    copied so that classifier-free guidance finds the null label through the wrapper.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.num_classes: int | None = getattr(net, "num_classes",
                                               getattr(getattr(net, "module", None), "num_classes", None))
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.net(x, t, labels)  # [B, C, H, W]


@torch.inference_mode()
def generate(net: torch.nn.Module, cfg: Config, seeds: Sequence[int], *, sampler: str, steps: int,
             guidance: float = 1.0, eta: float | None = None, labels: Sequence[int] | None = None,
             batch: int = 64, device: torch.device | None = None, nfe: list[int] | None = None,
             sampler_options: Callable[[int, SeededNoise], dict[str, Any]] | None = None,
             precision: str = "fp32") -> torch.Tensor:
    """uint8 [N, C, H, W] images, one per seed, decoded to data space (a latent run's: by the network's VAE, at
    the image size, after generation).

    The sampler options come from `cfg.sample` (eta unless given, clip_x0 with c = assigner.image_scale, the DDIM
    grid, the ODE tolerances). When `nfe` is given, the number of network calls of each generated batch is
    appended to it (one entry per batch of at most `batch` seeds). Image i depends on seed i alone, except with
    the adaptive "dopri5", whose step sizes (and NFE) follow the whole batch (see objectives/flow.py).
    `sampler_options(start, noise_source)` adds keyword arguments of `objective.sample` for the batch of seeds
    from index `start` (editing.py's `after_step` and `resample`).
    The noise follows `cfg.sample.noise` (per-image generators, or one counter-based draw per batch: other values,
    equally independent of the batch). `precision` "bf16" runs the network under bf16 autocast while the
    sampler's state stays float32 (eval.precision, for FID points).
    """
    device = device or next(net.parameters()).device
    objective = build_objective(cfg.objective)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    conditional = cfg.model.num_classes is not None
    # Clip at the data range in model space: image scaling multiplies the data in [-1, 1] by image_scale.
    clip_x0 = cfg.assigner.image_scale if cfg.sample.clip_x0 else None
    counting = CountingNet(net)
    decoder = vae.attached(net)
    if cfg.data.source == "latents" and decoder is None:
        raise RuntimeError("a latent run's network must carry its VAE (vae.attach) before it generates")
    out = []
    for start in range(0, len(seeds), batch):
        chunk = list(seeds[start:start + batch])
        noise_source = CounterNoise(chunk, device) if cfg.sample.noise == "counter" else SeededNoise(chunk, device)
        noise = noise_source.randn_like(torch.empty((len(chunk), *shape), device=device))  # [b, C, H, W]
        # x_T: N(0, start_std^2 I) or fitted to the training noise (start_noise.py); the sampler's draws stay N(0, I)
        noise = start_noise.start(noise, cfg.sample.start, cfg.sample.start_std, start_noise.attached(net))
        chunk_labels = None
        if conditional:
            chunk_labels = torch.tensor([labels[start + i] if labels is not None else s % cfg.model.num_classes
                                         for i, s in enumerate(chunk)], device=device)
        counting.reset()
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            x = objective.sample(counting, noise, sampler=sampler, steps=steps,
                                 eta=cfg.sample.eta if eta is None else eta, labels=chunk_labels,
                                 guidance=guidance, randn=noise_source.randn_like, clip_x0=clip_x0,
                                 grid=cfg.sample.ddim_grid, atol=cfg.sample.ode_atol, rtol=cfg.sample.ode_rtol,
                                 **(sampler_options(start, noise_source) if sampler_options else {}))  # model space
        if nfe is not None:
            nfe.append(counting.calls)
        if decoder is None:  # pixels: / image_scale, clipped to [-1, 1]
            images = assigners.decode(x.float(), cfg.assigner)  # [b, C, H, W]
        else:  # latents are not bounded: / image_scale, decoded, clipped to [-1, 1] by the VAE's decode
            images = decoder.decode(x.float() / cfg.assigner.image_scale)  # [b, 3, H f, W f]
        out.append(to_uint8(images).cpu())
    return torch.cat(out)
