"""The noise-level axis both analysis modes share: a level in [0, 1] (0 = clean data, 1 = pure noise) mapped to each
objective's own time and noising coefficients (the objective's `at_level` and `times_at_levels`), so DDPM and flow
runs are drawn on one axis.

x_t = signal * x0 + noise * n in every objective (x0 the clean, possibly scaled, image; n the assigned noise), the
target target_data * x0 + target_noise * n. For example DDPM (objectives/ddpm.py): t = min(round(level T), T - 1),
signal = sqrt(abar_t), noise = sqrt(1 - abar_t), target n; level 0.5 is t = 0.5T, level 1 is t = T - 1. Flow
(objectives/flow.py, data at t = 1): t = 1 - level, signal = t, noise = 1 - t, target the velocity x0 - n.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
import torch

from ..errors import UserError
from ..objectives import Objective

DEFAULT_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Noise levels of data mode by default: ten points, 0.5 and 0.9 (t = 0.5T and 0.9T for DDPM) among them."""


class LevelsError(UserError):
    """A `--levels` value that is not a list of noise levels in (0, 1]."""


@dataclass(frozen=True)
class NoiseLevel:
    """One point of the grid: its level, the objective's time there and the coefficients of x_t and the target."""

    level: float  # 0 = clean .. 1 = pure noise
    t: float  # the objective's time (DDPM: an integer timestep; flow: t in [0, 1], data at 1)
    signal: float  # coefficient of x0 in x_t
    noise: float  # coefficient of n in x_t
    target_data: float  # coefficient of x0 in the regression target
    target_noise: float  # coefficient of n in the regression target

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def parse_levels(text: str | None) -> tuple[float, ...]:
    """`--levels 0.1,0.5,0.9` -> sorted distinct levels in (0, 1]; None -> DEFAULT_LEVELS."""
    if text is None:
        return DEFAULT_LEVELS
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or not all(0.0 < v <= 1.0 and math.isfinite(v) for v in values):
        raise LevelsError(f"--levels {text}: expected a comma list of noise levels in (0, 1] (0 = clean, "
                          f"1 = pure noise), e.g. 0.1,0.5,0.9")
    return tuple(values)


def noise_level(objective: Objective, level: float) -> NoiseLevel:
    """The grid point at `level` in (0, 1] for this objective (see the module docstring)."""
    return NoiseLevel(level, *objective.at_level(level))


def times_in_bin(objective: Objective, low: float, high: float, count: int,
                 generator: torch.Generator) -> torch.Tensor:
    """`count` training times [count] whose noise level is uniform in [low, high) (`times_at_levels`: DDPM integer
    timesteps floor(level T), long; flow t = 1 - level, float32)."""
    level = low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)  # [count]
    return objective.times_at_levels(level)
