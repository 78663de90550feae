"""Flow-matching objective: the straight (rectified-flow / I-CFM) path of the official torchcfm CIFAR-10 code.

Symbols of the flow papers (Liu et al. 2023, rectified flow, Eq. 1; Tong et al. 2024, I-CFM with sigma = 0):
x_t = t x1 + (1 - t) x0 with x0 the NOISE and x1 the DATA, target velocity x1 - x0, t ~ U[0, 1]. Because "x0"
means the clean image everywhere else in this package (and in the DDPM file), this file never says x0 or x1: it
says `data` and `noise`. The noise is supplied by the caller (the assigner) and is used both to build x_t and in
the target.

Samplers integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) on the uniform grid t_i = i / N:
- "euler": N steps, N network evaluations.
- "heun": Heun's 2nd-order method as in EDM (Karras et al. 2022, Algorithm 1): the correction is skipped on the
  final step, which is a plain Euler step into t = 1, so 2N - 1 evaluations. Why: the net is never evaluated at
  t = 1 exactly, where the ideal velocity of a low-entropy data distribution is singular ((x1 - x) / (1 - t)).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from immiscible_cli.config import SAMPLERS, FlowObjective
from immiscible_cli.objectives.guidance import guided_prediction

# t in [0, 1] is shown to the net as 999 t: the same [0, 999] range as DDPM's integer timesteps, where the
# sinusoidal embedding's frequencies (periods up to 10^4 time units) separate nearby times well.
NET_TIME_SCALE = 999.0


class Flow:
    """Velocity-prediction flow matching on the straight noise-to-data path (config `objective.kind: flow`)."""

    samplers: tuple[str, ...] = SAMPLERS["flow"]

    def __init__(self, cfg: FlowObjective):
        self.cfg = cfg

    def sample_t(self, batch: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        """Times [B] ~ U[0, 1), float32, drawn on the generator's device then moved to `device`."""
        t = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float32)
        return t.to(device)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the net sees: 999 t in [0, 999] (float32), the scale DDPM's timesteps have."""
        return t.to(torch.float32) * NET_TIME_SCALE

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

    def sample(self, net: nn.Module, noise: torch.Tensor, *, sampler: str, steps: int, eta: float = 0.0,
               labels: torch.Tensor | None = None, guidance: float = 1.0,
               randn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Integrate from `noise` [B, C, H, W] at t = 0 to model space at t = 1 (no clipping, no decoding).

        Deterministic ODE samplers: `eta` and `randn` are accepted for a uniform interface and not used.
        Classifier-free guidance applies to the velocity when labels are given and guidance != 1.
        """
        if sampler not in self.samplers:
            raise ValueError(f"sampler '{sampler}' does not go with the flow objective "
                             f"(accepted: {', '.join(self.samplers)})")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        grid = [i / steps for i in range(steps + 1)]  # t_0 = 0 (noise) ... t_N = 1 (data)

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            t_net = self.net_time(torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))  # [B]
            return guided_prediction(net, x, t_net, labels, guidance).to(x.dtype)  # [B, C, H, W]

        x = noise  # [B, C, H, W]
        for i in range(steps):
            t_cur, t_next = grid[i], grid[i + 1]
            h = t_next - t_cur
            v_cur = velocity(x, t_cur)
            x_euler = x + h * v_cur
            if sampler == "euler" or i == steps - 1:  # Heun's last step is Euler (see module docstring)
                x = x_euler
            else:
                x = x + 0.5 * h * (v_cur + velocity(x_euler, t_next))  # trapezoidal correction
        return x
