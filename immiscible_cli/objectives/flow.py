"""Flow-matching objective: the straight (rectified-flow / I-CFM) path of the official torchcfm CIFAR-10 code.

Symbols of the flow papers (Liu et al. 2023, rectified flow, Eq. 1; Tong et al. 2024, I-CFM with sigma = 0):
x_t = t x1 + (1 - t) x0 with x0 the NOISE and x1 the DATA, target velocity x1 - x0, t ~ U[0, 1]. Because "x0"
means the clean image everywhere else in this package (and in the DDPM file), this file never says x0 or x1: it
says `data` and `noise`. The noise is supplied by the caller (the assigner) and is used both to build x_t and in
the target. The network sees t as t * `objective.net_time_scale` (999 by default; torchcfm shows t itself, 1.0).

Samplers integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data):
- "euler": N steps on the uniform grid t_i = i / N, N network evaluations.
- "heun": Heun's 2nd-order method as in EDM (Karras et al. 2022, Algorithm 1) on the same grid: the correction is
  skipped on the final step, which is a plain Euler step into t = 1, so 2N - 1 evaluations. Why: the net is never
  evaluated at t = 1 exactly, where the ideal velocity of a low-entropy data distribution is singular
  ((x1 - x) / (1 - t)).
- "dopri5": adaptive Dormand-Prince 5(4) from torchdiffeq with tolerances atol / rtol, as torchcfm's CIFAR-10
  sampler (`odeint(..., t_span=[0, 1], method="dopri5")`); it chooses its own steps (N is ignored). Its step sizes
  come from an error norm over the whole batch, so an image depends on its batch by up to the solver's error
  (unlike the fixed-grid samplers). Like torchcfm's, its last step may pass t = 1 (the net is then evaluated at
  t slightly above 1) and the solution at t = 1 is read off its dense-output interpolant.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from immiscible_cli.config import SAMPLERS, FlowObjective, SampleConfig
from immiscible_cli.objectives.guidance import guided_prediction
from immiscible_cli.objectives.protocol import Coefficients


class Flow:
    """Velocity-prediction flow matching on the straight noise-to-data path (config `objective.kind: flow`)."""

    samplers: tuple[str, ...] = SAMPLERS["flow"]
    editable_samplers: tuple[str, ...] = ("euler", "heun")  # dopri5's adaptive steps have no fixed points
    batch_dependent_samplers: tuple[str, ...] = ("dopri5",)  # its step sizes follow the whole batch's error
    sampler_fields: tuple[str, ...] = ("ode_atol", "ode_rtol")

    def __init__(self, cfg: FlowObjective):
        self.cfg = cfg

    def sample_t(self, batch: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        """Times [B] ~ U[0, 1), float32, drawn on the generator's device then moved to `device`."""
        t = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float32)
        return t.to(device)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the net sees: t * net_time_scale (float32). 999 puts t on DDPM's timestep range, where the
        sinusoidal embedding's frequencies (periods up to 10^4 time units) separate nearby times well; torchcfm
        shows t in [0, 1] itself (scale 1.0)."""
        return t.to(torch.float32) * self.cfg.net_time_scale

    def loss(self, net: Callable[..., torch.Tensor], data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, /,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample flow-matching loss: mean over C, H, W of |(data - noise) - v(x_t, t)|^2, [B].

        x_t = t data + (1 - t) noise (x_t = t x1 + (1 - t) x0 in the papers' symbols), target data - noise.
        """
        t_image = t.to(data.dtype).view((-1,) + (1,) * (data.ndim - 1))  # [B, 1, 1, 1]
        x_t = t_image * data + (1.0 - t_image) * noise  # [B, C, H, W]
        velocity = net(x_t, self.net_time(t), labels)  # [B, C, H, W]
        target = data.float() - noise.float()
        return (velocity.float() - target).square().flatten(1).mean(dim=1)  # [B]

    def noised(self, data: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
        """x_t = t data + (1 - t) noise at the sampler level t (data at t = 1)."""
        return level * data + (1.0 - level) * noise  # [B, C, H, W]

    def at_level(self, level: float) -> Coefficients:
        """Noise level in (0, 1] -> t = 1 - level, x_t = t x0 + (1 - t) n, target the velocity x0 - n."""
        t = 1.0 - level
        return Coefficients(t, t, 1.0 - t, 1.0, -1.0)

    def times_at_levels(self, levels: torch.Tensor) -> torch.Tensor:
        """Times t = 1 - level (float32) at noise levels [N]."""
        return (1.0 - levels).to(torch.float32)

    @classmethod
    def sampler_settings(cls, sample: SampleConfig, sampler: str) -> dict[str, Any]:
        """dopri5's tolerances (the fixed-grid samplers read no other field)."""
        adaptive = sampler == "dopri5"
        return {"ode_atol": sample.ode_atol if adaptive else None, "ode_rtol": sample.ode_rtol if adaptive else None}

    def sample(self, net: nn.Module, noise: torch.Tensor, *, sampler: str, steps: int, eta: float = 0.0,
               labels: torch.Tensor | None = None, guidance: float = 1.0,
               randn: Callable[[torch.Tensor], torch.Tensor] | None = None, clip_x0: float | None = None,
               grid: str = "linspace", atol: float = 1e-4, rtol: float = 1e-4,
               after_step: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
               resample: int = 0) -> torch.Tensor:
        """Integrate from `noise` [B, C, H, W] at t = 0 to model space at t = 1 (no clipping, no decoding).

        Deterministic ODE samplers: `eta`, `randn`, `clip_x0` and `grid` (DDPM options) are accepted for a uniform
        interface and not used; `atol` and `rtol` are dopri5's tolerances, `steps` is ignored by dopri5.
        Classifier-free guidance applies to the velocity when labels are given and guidance != 1.

        Editing (RePaint, Lugmayr et al. 2022): `after_step(x, t_next)` replaces x after every step of the fixed
        grid (x is then at t_next; 1.0 after the last). With `resample = R`, every step but the last is taken
        R + 1 times, each retry from x noised back to the step's start by `renoise` (fresh noise from `randn`).
        dopri5 takes neither: its adaptive steps (and rejected trials) have no fixed points to re-impose at.
        """
        if sampler not in self.samplers:
            raise ValueError(f"sampler '{sampler}' does not go with the flow objective "
                             f"(accepted: {', '.join(self.samplers)})")
        if resample < 0 or (resample > 0 and randn is None):
            raise ValueError(f"resample must be >= 0 and needs `randn` for its fresh noise, got {resample}")

        def velocity(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
            t_batch = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])  # [B]
            return guided_prediction(net, x, self.net_time(t_batch), labels, guidance).to(x.dtype)  # [B, C, H, W]

        if sampler == "dopri5":
            if after_step is not None or resample:
                raise ValueError("sampler 'dopri5' cannot re-impose a known region (after_step, resample); "
                                 "use 'euler' or 'heun'")
            return self._dopri5(velocity, noise, atol, rtol)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        times = [i / steps for i in range(steps + 1)]  # t_0 = 0 (noise) ... t_N = 1 (data)
        x = noise  # [B, C, H, W]
        for i in range(steps):
            t_cur, t_next = times[i], times[i + 1]
            h = t_next - t_cur
            for attempt in range(1 + (resample if i + 1 < steps else 0)):
                if attempt:  # RePaint's jump back from t_next to t_cur
                    x = self.renoise(x, t_next, t_cur, randn)  # [B, C, H, W]
                v_cur = velocity(x, t_cur)  # [B, C, H, W]
                x_euler = x + h * v_cur  # [B, C, H, W]
                if sampler == "euler" or i == steps - 1:  # Heun's last step is Euler (see module docstring)
                    x = x_euler
                else:
                    x = x + 0.5 * h * (v_cur + velocity(x_euler, t_next))  # trapezoidal correction
                if after_step is not None:
                    x = after_step(x, t_next)  # [B, C, H, W]
        return x

    @staticmethod
    def renoise(x: torch.Tensor, t_from: float, t_to: float,
                randn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x [B, C, H, W] at t_from > 0 noised back to t_to in [0, t_from], with fresh Gaussian noise z:
        x_to = (t_to / t_from) x + s z with s^2 = (1 - t_to)^2 - (t_to (1 - t_from) / t_from)^2, so that
        x_from = t_from data + (1 - t_from) noise becomes t_to data + (1 - t_to) noise' in distribution."""
        ratio = t_to / t_from
        spread = max((1.0 - t_to) ** 2 - (ratio * (1.0 - t_from)) ** 2, 0.0) ** 0.5
        return ratio * x + spread * randn(x)  # [B, C, H, W]

    @staticmethod
    def _dopri5(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                atol: float, rtol: float) -> torch.Tensor:
        """x(1) of dx/dt = velocity(x, t), x(0) = noise [B, C, H, W], by torchdiffeq's adaptive dopri5."""
        try:
            from torchdiffeq import odeint  # lazy: only this sampler needs it
        except ImportError as error:
            raise ValueError("sampler 'dopri5' needs the torchdiffeq package (pip install 'torchdiffeq>=0.2.3'); "
                             "or use sampler 'euler' or 'heun'") from error
        t_span = torch.tensor([0.0, 1.0], device=noise.device)  # [2]: noise at 0, data at 1
        # torchdiffeq calls func(t, x) with a 0-d time tensor; odeint returns x at every time of t_span.
        trajectory = odeint(lambda t, x: velocity(x, t), noise, t_span, method="dopri5", atol=atol, rtol=rtol)
        return trajectory[-1]  # [B, C, H, W]
