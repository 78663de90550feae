"""DDPM objective (Ho et al. 2020): linear beta schedule, epsilon-prediction loss, DDIM and ancestral samplers.

Symbols: T steps, beta_t linear from beta_start to beta_end, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s
(timesteps are 0-based: t in [0, T)). The noise is supplied by the caller (the assigner) and is used both to build
x_t and as the regression target, so a pairing rule changes what the net is trained on consistently.

Samplers run over N timesteps tau_{N-1} > ... > tau_0 (`sampling_timesteps`), on one of two grids:
- "linspace" (default): round(linspace(0, T - 1, N)), which starts at T - 1 (the noise level sampling starts from)
  and ends at 0 (N = 1 uses T - 1 alone).
- "stride": tqch/ddpm-torch's arange(0, T, T // N), e.g. 980, 960, ..., 0 for T = 1000, N = 50. Where N does not
  divide T that arange has more than N entries (31 for N = 30: 990, 957, ..., 0) and, as in tqch, all of them are
  used, so the network is evaluated more than N times (the FID row records the evaluations).
The step from tau_0 goes to "abar = 1", i.e. it returns the predicted x0. With N = T both grids are 0..T-1.

`clip_x0 = c` clips the predicted x0 to [-c, c] at every step (tqch/ddpm-torch's clip_denoised, diffusers'
clip_sample); DDIM then recomputes eps from the clipped x0 so that the step stays on the line through x_t.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from immiscible_cli.config import SAMPLERS, DDPMObjective, SampleConfig
from immiscible_cli.objectives.guidance import guided_prediction
from immiscible_cli.objectives.protocol import Coefficients

GRIDS: tuple[str, ...] = ("linspace", "stride")


class DDPM:
    """Epsilon-prediction diffusion with a linear beta schedule (config `objective.kind: ddpm`)."""

    samplers: tuple[str, ...] = SAMPLERS["ddpm"]
    editable_samplers: tuple[str, ...] = SAMPLERS["ddpm"]  # both call after_step at every step
    batch_dependent_samplers: tuple[str, ...] = ()
    sampler_fields: tuple[str, ...] = ("eta", "clip_x0", "ddim_grid")

    def __init__(self, cfg: DDPMObjective):
        self.T = cfg.timesteps
        self.betas = torch.linspace(cfg.beta_start, cfg.beta_end, self.T, dtype=torch.float64)  # [T]
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)  # [T], float64 on the CPU
        self._alpha_bar_values: list[float] = self.alpha_bar.tolist()  # sampler coefficients, no device syncs
        self._noising_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _noising_coefficients(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar), sqrt(1 - abar)) as float32 [T] on `device`, copied there once and cached."""
        if device not in self._noising_cache:
            self._noising_cache[device] = (self.alpha_bar.sqrt().float().to(device),
                                           (1.0 - self.alpha_bar).sqrt().float().to(device))
        return self._noising_cache[device]

    def sample_t(self, batch: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        """Integer timesteps [B] uniform in [0, T), long, drawn on the generator's device then moved to `device`."""
        t = torch.randint(0, self.T, (batch,), generator=generator, device=generator.device)
        return t.to(device)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the net sees: the integer timestep as float32 (0..T-1), as in DDPM/ADM."""
        return t.to(torch.float32)

    def loss(self, net: Callable[..., torch.Tensor], x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, /,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample L_simple (Ho et al. 2020, Eq. 14): mean over C, H, W of |noise - eps(x_t, t)|^2, [B].

        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Eq. 4), with the caller's `noise` as the target too.
        """
        sqrt_abar, sqrt_one_minus_abar = self._noising_coefficients(x0.device)
        broadcast = (-1,) + (1,) * (x0.ndim - 1)
        x_t = sqrt_abar[t].view(broadcast) * x0 + sqrt_one_minus_abar[t].view(broadcast) * noise  # [B, C, H, W]
        eps = net(x_t, self.net_time(t), labels)  # [B, C, H, W]
        return (eps.float() - noise.float()).square().flatten(1).mean(dim=1)  # [B]

    def noised(self, data: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
        """x_t = sqrt(abar) data + sqrt(1 - abar) noise (Ho et al. 2020, Eq. 4) at the sampler level abar."""
        return math.sqrt(level) * data + math.sqrt(1.0 - level) * noise  # [B, C, H, W]

    def at_level(self, level: float) -> Coefficients:
        """Noise level in (0, 1] -> t = min(round(level T), T - 1), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n,
        target n (eps-prediction). Level 0.5 is t = 0.5T, level 1 is t = T - 1."""
        t = min(round(level * self.T), self.T - 1)
        abar = float(self.alpha_bar[t])
        return Coefficients(t, math.sqrt(abar), math.sqrt(1.0 - abar), 0.0, 1.0)

    def times_at_levels(self, levels: torch.Tensor) -> torch.Tensor:
        """Integer timesteps floor(level T) (long, clamped to [0, T)) at noise levels [N]."""
        return (levels * self.T).floor().long().clamp(0, self.T - 1)

    @classmethod
    def sampler_settings(cls, sample: SampleConfig, sampler: str) -> dict[str, Any]:
        """eta (DDIM only), clip_x0 and the timestep grid: the sample.* fields these samplers read."""
        return {"eta": sample.eta if sampler == "ddim" else None, "clip_x0": sample.clip_x0,
                "ddim_grid": sample.ddim_grid}

    def sampling_timesteps(self, steps: int, grid: str = "linspace") -> list[int]:
        """The N sampler timesteps, descending, on the "linspace" or "stride" grid (see the module docstring)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in [1, {self.T}] for T = {self.T}, got {steps}")
        if grid == "stride":
            return list(range(0, self.T, self.T // steps))[::-1]  # T // steps >= 1 because steps <= T
        if grid != "linspace":
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got '{grid}'")
        if steps == 1:
            return [self.T - 1]
        return torch.linspace(0, self.T - 1, steps, dtype=torch.float64).round().long().flip(0).tolist()

    def sample(self, net: nn.Module, noise: torch.Tensor, *, sampler: str, steps: int, eta: float = 0.0,
               labels: torch.Tensor | None = None, guidance: float = 1.0,
               randn: Callable[[torch.Tensor], torch.Tensor] | None = None, clip_x0: float | None = None,
               grid: str = "linspace", atol: float = 1e-4, rtol: float = 1e-4,
               after_step: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
               resample: int = 0) -> torch.Tensor:
        """Generate from `noise` [B, C, H, W] ~ N(0, I) to model space (no decoding).

        sampler "ddim": Song et al. 2021, Eq. 12 with sigma from Eq. 16 (eta in [0, 1]; eta = 0 is deterministic).
        sampler "ddpm": ancestral sampling (Ho et al. 2020, Algorithm 2) on the respaced schedule, with the posterior
        variance beta-tilde (Eq. 7). `randn(like)` returns fresh per-image-seeded noise shaped like x; it is called
        once per stochastic step, in step order, always with the full batch. Classifier-free guidance applies when
        labels are given and guidance != 1. `clip_x0 = c` clips the predicted x0 to [-c, c] at every step (None:
        no clipping); `grid` picks the timesteps. `atol` and `rtol` (flow ODE tolerances) are accepted for the
        uniform interface and not used.

        Editing (RePaint, Lugmayr et al. 2022): `after_step(x, abar_prev)` replaces x after every step, x being then
        at the level abar_prev (1.0 after the last step). With `resample = R`, every step but the last is taken
        R + 1 times, each retry from x noised back to the step's start by `renoise` (fresh noise from `randn`).
        """
        if sampler not in self.samplers:
            raise ValueError(f"sampler '{sampler}' does not go with the ddpm objective "
                             f"(accepted: {', '.join(self.samplers)})")
        if sampler == "ddim" and not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
        if clip_x0 is not None and not clip_x0 > 0.0:
            raise ValueError(f"clip_x0 must be positive (or None for no clipping), got {clip_x0}")
        taus = self.sampling_timesteps(steps, grid)
        stochastic = (sampler == "ddpm" or eta > 0.0) and len(taus) > 1
        if stochastic and randn is None:
            raise ValueError(f"sampler '{sampler}' with eta={eta} needs `randn` for its fresh noise")
        if resample < 0 or (resample > 0 and randn is None):
            raise ValueError(f"resample must be >= 0 and needs `randn` for its fresh noise, got {resample}")

        x = noise  # [B, C, H, W]
        for i, tau in enumerate(taus):
            abar = self._alpha_bar_values[tau]
            abar_prev = self._alpha_bar_values[taus[i + 1]] if i + 1 < len(taus) else 1.0
            t_net = self.net_time(torch.full((x.shape[0],), tau, dtype=torch.long, device=x.device))  # [B]
            for attempt in range(1 + (resample if i + 1 < len(taus) else 0)):
                if attempt:  # RePaint's jump back: x_tau ~ q(x_tau | x_tau_prev)
                    x = self.renoise(x, abar_prev, abar, randn)  # [B, C, H, W]
                eps = guided_prediction(net, x, t_net, labels, guidance).to(x.dtype)  # [B, C, H, W]
                x = self._step(x, eps, abar, abar_prev, sampler=sampler, eta=eta, clip_x0=clip_x0, randn=randn)
                if after_step is not None:
                    x = after_step(x, abar_prev)  # [B, C, H, W]
        return x

    @staticmethod
    def _step(x: torch.Tensor, eps: torch.Tensor, abar: float, abar_prev: float, *, sampler: str, eta: float,
              clip_x0: float | None, randn: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """One sampler step from x [B, C, H, W] at level abar to abar_prev, given the network's eps there: DDIM
        (Eq. 12, sigma from Eq. 16) or the ancestral step on the respaced schedule (Eq. 6-7)."""
        x0_pred = (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)  # Eq. 12's "predicted x0"
        if clip_x0 is not None:
            x0_pred = x0_pred.clamp(-clip_x0, clip_x0)  # [B, C, H, W]
            # Eq. 4 solved for eps with the clipped x0: DDIM's "direction pointing to x_t" must agree.
            eps = (x - math.sqrt(abar) * x0_pred) / math.sqrt(1.0 - abar)  # [B, C, H, W]
        if sampler == "ddim":
            # sigma (Eq. 16) is exactly 0 on the last step, where abar_prev = 1.
            sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
            x = math.sqrt(abar_prev) * x0_pred + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
            return x + sigma * randn(x) if sigma > 0.0 else x
        # Respaced step tau -> tau_prev: alpha = abar / abar_prev, beta = 1 - alpha; Eq. 6-7's posterior (its mean
        # takes the clipped x0 when clipping, as tqch/ddpm-torch's p_mean_var).
        alpha = abar / abar_prev
        beta = 1.0 - alpha
        mean = (math.sqrt(abar_prev) * beta / (1.0 - abar) * x0_pred
                + math.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar) * x)  # [B, C, H, W]
        variance = (1.0 - abar_prev) / (1.0 - abar) * beta  # beta-tilde; 0 on the last step
        return mean + math.sqrt(variance) * randn(x) if variance > 0.0 else mean

    @staticmethod
    def renoise(x: torch.Tensor, abar_from: float, abar_to: float,
                randn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x [B, C, H, W] at level abar_from noised forward to abar_to <= abar_from: the respaced forward step
        (Ho et al. 2020, Eq. 2 with beta = 1 - abar_to / abar_from), so x_t keeps its Eq. 4 marginal."""
        alpha = abar_to / abar_from
        return math.sqrt(alpha) * x + math.sqrt(1.0 - alpha) * randn(x)  # [B, C, H, W]
