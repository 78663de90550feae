"""The moments of the noise a run trained with, and the sampling start fitted to them (`sample.start: matched`).

The trainer adds every paired noise batch to `NoiseMoments` (float64 sums over the whole run: the mean image and
the mean |n|^2 / D), keeps them in every snapshot (`noise_moments`) and in the kept network, reduced over the
processes. A network loaded from such a file carries them as an attribute (`attach`), so every user of
`generation.generate` (FID, grids, `sample`, in-painting) starts where `cfg.sample.start` says:
- `standard`: x_T = start_std * z, z ~ N(0, I) (the papers');
- `matched`: x_T = m + s * start_std * z, with m the mean noise image and s^2 = E|n|^2/D - |m|^2/D, i.e. the
  isotropic Gaussian with the training noise's mean image and its mean squared norm.
For vanilla and linear assignment (exactly N(0, I)) `matched` differs from `standard` only by the estimation error
of m and s (a few thousandths after 60k images); for KNN's `l2` score it undoes the shorter norm and the tilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import UserError

_ATTRIBUTE = "immiscible_noise_moments"


@dataclass
class NoiseMoments:
    """Running float64 sums of the training noise: `total` [C, H, W] (sum of n), `sqtotal` (sum of |n|^2 / D) and
    `count` (images added)."""

    total: Tensor
    sqtotal: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device: torch.device) -> "NoiseMoments":
        return cls(torch.zeros(shape, dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.float64, device=device))

    def add(self, noise: Tensor) -> None:
        """Add a batch [b, C, H, W] (no host sync)."""
        flat = noise.detach().to(torch.float64)
        self.total += flat.sum(dim=0)
        self.sqtotal += flat.square().sum() / flat[0].numel()
        self.count += noise.shape[0]

    def mean(self) -> Tensor:
        """The mean noise image [C, H, W] (float64)."""
        return self.total / max(self.count, 1)

    def sqnorm(self) -> float:
        """Mean |n|^2 / D over every image added."""
        return float(self.sqtotal) / max(self.count, 1)

    def std(self) -> float:
        """s of the matched start: sqrt(E|n|^2/D - |m|^2/D)."""
        mean = self.mean()
        return max(self.sqnorm() - float(mean.square().mean()), 0.0) ** 0.5

    def state(self) -> dict:
        return {"count": self.count, "total": self.total.cpu(), "sqtotal": self.sqtotal.cpu()}

    @classmethod
    def from_state(cls, state, shape: tuple[int, ...], device: torch.device) -> "NoiseMoments | None":
        """The moments stored in a snapshot, or None when absent or malformed (wrong shape, type, non-finite)."""
        if not isinstance(state, dict):
            return None
        total, sqtotal, count = state.get("total"), state.get("sqtotal"), state.get("count")
        if not (isinstance(total, Tensor) and isinstance(sqtotal, Tensor) and isinstance(count, int)
                and tuple(total.shape) == tuple(shape) and sqtotal.numel() == 1 and count > 0
                and bool(torch.isfinite(total).all()) and bool(torch.isfinite(sqtotal).all())):
            return None
        return cls(total.to(device, torch.float64), sqtotal.reshape(()).to(device, torch.float64), count)

    def summary(self) -> dict[str, float]:
        """What an FID row records of a matched start: images behind it, s, |m|^2/D and mean |n|^2/D."""
        mean = self.mean()
        return {"images": self.count, "std": round(self.std(), 6),
                "mean_sqnorm": round(float(mean.square().mean()), 6), "sqnorm": round(self.sqnorm(), 6)}


def attach(net: torch.nn.Module, moments: NoiseMoments | None) -> torch.nn.Module:
    """Let `net` carry the moments of its training noise (read by `start`); returns net."""
    setattr(net, _ATTRIBUTE, moments)
    return net


def attached(net: torch.nn.Module) -> NoiseMoments | None:
    return getattr(net, _ATTRIBUTE, None)


def check_available(start: str, moments: NoiseMoments | None, where: str) -> None:
    """One line when `sample.start: matched` is asked of a network without moments."""
    if start == "matched" and moments is None:
        raise UserError(f"{where}: sample.start=matched needs the moments of the training noise, which this "
                        f"checkpoint does not hold (it was written before immiscible 0.3); use sample.start=standard")


def start(z: Tensor, start_kind: str, start_std: float, moments: NoiseMoments | None) -> Tensor:
    """x_T from standard normal draws z [b, C, H, W] (see the module docstring)."""
    if start_kind == "matched":
        check_available(start_kind, moments, "sampling")
        mean = moments.mean().to(z.device, torch.float32)
        return z * (moments.std() * start_std) + mean
    return z * start_std if start_std != 1.0 else z
