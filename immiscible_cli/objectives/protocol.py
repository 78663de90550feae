"""What every objective offers, so that the trainer, the samplers, editing, analysis and the FID row's settings
work for an objective without naming it (adding one is its file, its config section and its registry line).

The interface (`Objective`):
- `sample_t(batch, generator, device) -> t [B]`: training times (ddpm: long in [0, T); flow: float32 in [0, 1)).
- `net_time(t) -> [B] float32`: the time value the network is shown for t.
- `loss(net, clean, noise, t, /, labels=None) -> [B]`: per-sample MSE; `noise` (from the assigner) builds x_t
  and is the target. The first four arguments are positional-only: "x0" means different things in the two papers.
- `sample(net, noise, *, sampler, steps, eta=0.0, labels=None, guidance=1.0, randn=None, clip_x0=None,
  grid="linspace", atol=1e-4, rtol=1e-4, after_step=None, resample=0) -> [B, C, H, W]`: samples in model space
  (the caller decodes). One signature for every objective; each uses the options that concern it and ignores the
  others: ddpm: `eta` (DDIM stochasticity), `randn` (fresh per-image noise), `clip_x0` (clip the predicted x0 to
  [-c, c] at every step; None = off), `grid` ("linspace" or "stride" timesteps); flow: `atol`, `rtol`
  (tolerances of the adaptive "dopri5"; `steps` is ignored there). All: `steps`, `labels` and `guidance`
  (classifier-free guidance). The number of network calls is the caller's to count (generation.CountingNet).
  Editing (editing.py): `after_step(x, level) -> x` replaces x after every step, at its new sampler level (ddpm:
  abar, flow: t; 1.0 = clean after the last step), and `resample = R` retries every step but the last R times
  from x noised back by `renoise(x, level_from, level_to, randn)` (RePaint).
- `noised(data, noise, level) -> x`: clean `data` at the sampler level `level` of `after_step` with this `noise`
  (editing re-imposes the known image with it; 1.0 gives `data`).
- `at_level(level) -> Coefficients`: the objective's time and the coefficients of x_t and of the regression target
  at a noise level in (0, 1] (0 = clean, 1 = pure noise), the axis analysis draws every objective on.
- `times_at_levels(levels) -> t [N]`: training times (as `sample_t` makes them) at noise levels [N] float64.
- `samplers`: the sampler names the objective accepts (equal to config.SAMPLERS[kind]); `editable_samplers`: those
  that call `after_step` (editing refuses the others); `batch_dependent_samplers`: those whose image of a seed
  depends on the rest of its batch (an FID point's first images are then not the snapshot grid's); `sampler_fields`: the `sample.*` fields besides sampler,
  steps and guidance that its samplers read, and `sampler_settings(sample, sampler)` their values for one sampler
  (the FID row's `sampling` field: every objective's fields, null where unused, objectives.sampler_settings).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import torch
from torch import nn

from immiscible_cli.config import SampleConfig


class Coefficients(NamedTuple):
    """An objective at one noise level: x_t = signal x0 + noise n, target = target_data x0 + target_noise n."""

    t: float  # the objective's time (ddpm: an integer timestep; flow: t in [0, 1], data at 1)
    signal: float  # coefficient of the clean image x0 in x_t
    noise: float  # coefficient of the noise n in x_t
    target_data: float  # coefficient of x0 in the regression target
    target_noise: float  # coefficient of n in the regression target


class Objective(Protocol):
    """The interface above; DDPM and Flow satisfy it structurally."""

    samplers: tuple[str, ...]
    editable_samplers: tuple[str, ...]
    batch_dependent_samplers: tuple[str, ...]
    sampler_fields: tuple[str, ...]

    def sample_t(self, batch: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor: ...

    def net_time(self, t: torch.Tensor) -> torch.Tensor: ...

    def loss(self, net: Callable[..., torch.Tensor], clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, /,
             labels: torch.Tensor | None = None) -> torch.Tensor: ...

    def sample(self, net: nn.Module, noise: torch.Tensor, *, sampler: str, steps: int, eta: float = 0.0,
               labels: torch.Tensor | None = None, guidance: float = 1.0,
               randn: Callable[[torch.Tensor], torch.Tensor] | None = None, clip_x0: float | None = None,
               grid: str = "linspace", atol: float = 1e-4, rtol: float = 1e-4,
               after_step: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
               resample: int = 0) -> torch.Tensor: ...

    def noised(self, data: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor: ...

    def at_level(self, level: float) -> Coefficients: ...

    def times_at_levels(self, levels: torch.Tensor) -> torch.Tensor: ...

    @classmethod
    def sampler_settings(cls, sample: SampleConfig, sampler: str) -> dict[str, Any]: ...
