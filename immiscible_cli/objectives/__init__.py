"""Training objectives: one per file (ddpm.py, flow.py), a registry keyed by the config's `objective.kind`.

Every objective offers the same interface, which the trainer and the samplers rely on:
- `sample_t(batch, generator, device) -> t [B]`: training times (ddpm: long in [0, T); flow: float32 in [0, 1)).
- `net_time(t) -> [B] float32`: the time value the network is shown for t.
- `loss(net, clean, noise, t, /, labels=None) -> [B]`: per-sample MSE; `noise` (from the assigner) builds x_t
  and is the target. The first four arguments are positional-only: "x0" means different things in the two papers.
- `sample(net, noise, *, sampler, steps, eta=0.0, labels=None, guidance=1.0, randn=None, clip_x0=None,
  grid="linspace", atol=1e-4, rtol=1e-4, after_step=None, resample=0) -> [B, C, H, W]`: samples in model space (the caller decodes). One
  signature for both objectives; each uses the options that concern it and ignores the others:
  ddpm: `eta` (DDIM stochasticity), `randn` (fresh per-image noise), `clip_x0` (clip the predicted x0 to
  [-c, c] at every step; None = off), `grid` ("linspace" or "stride" timesteps);
  flow: `atol`, `rtol` (tolerances of the adaptive "dopri5"; `steps` is ignored there).
  Both: `steps`, `labels` and `guidance` (classifier-free guidance). The number of network calls is the caller's
  to count (generation.CountingNet). Editing (editing.py): `after_step(x, level) -> x` replaces x after every step,
  at its new noise level (ddpm: abar, flow: t; 1.0 = clean after the last step), and `resample = R` retries every
  step but the last R times from x noised back by `renoise(x, level_from, level_to, randn)` (RePaint).
- `samplers`: the sampler names the objective accepts (equal to config.SAMPLERS[kind]).
"""

from __future__ import annotations

from typing import Union

from immiscible_cli.config import DDPMObjective, FlowObjective
from immiscible_cli.objectives.ddpm import DDPM
from immiscible_cli.objectives.flow import Flow

OBJECTIVES: dict[str, type[DDPM] | type[Flow]] = {"ddpm": DDPM, "flow": Flow}


def build_objective(cfg: Union[DDPMObjective, FlowObjective]) -> Union[DDPM, Flow]:
    """The objective for a validated `objective` config section, picked by its `kind`."""
    return OBJECTIVES[cfg.kind](cfg)


__all__ = ["DDPM", "Flow", "OBJECTIVES", "build_objective"]
