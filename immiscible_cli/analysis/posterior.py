"""How far apart a batch's trajectories stay, and the loss no network can remove, from the batch posterior.

For a batch of B clean images x0_1..x0_B (after image scaling: the assigner's x0' = c x0) and their assigned noises
n_1..n_B, x_t,i = a x0_i + s n_i (levels.NoiseLevel: a = signal, s = noise). The batch posterior of "which image"
given x_t,i is the softmax over j of the Gaussian log-likelihood of x_t,i given x0_j:

    w_ij = softmax_j( -|x_t,i - a x0_j|^2 / (2 s^2) )          (uniform prior over the batch's images)

- posterior of the own image: w_ii; accuracy: argmax_j w_ij == i. Higher = trajectories further apart (less
  miscible). With vanilla pairing n ~ N(0, I) independent of x0, so this is the exact posterior for the batch.
- irreducible loss: the best predictor of the target y_i = cx x0_i + cn n_i (eps for DDPM, the velocity for flow)
  given x_t,i under that posterior is sum_j w_ij (cx x0_j + cn (x_t,i - a x0_j) / s), whose error is
  (cx - cn a / s)^2 |x0_i - sum_j w_ij x0_j|^2; per dimension (divided by D), averaged over the batch, it is the
  part of the training loss at that level that no network can remove for this batch (0 where w is one-hot).

Limits. Under KNN or linear-assignment pairing the noise given its image is no longer N(0, I) (it leans towards the
image, and linear assignment couples the batch), so the true likelihood of x_t given x0_j is not the Gaussian
above. The same Gaussian posterior is used for every rule: the numbers are those of the best denoiser that knows the
batch's images and assumes Gaussian noise, an estimate of the true posterior and loss, exact only for vanilla. The
batch stands for the data set (the best denoiser of B images), so values depend on B.

Every quantity comes from two B x B Gram matrices (x0 . x0 and n . x0), in float64: no [B, B, D] tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .levels import NoiseLevel


def batch_grams(x0: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(G = x0 x0^T [B, B], C = n x0^T [B, B] with C_ij = n_i . x0_j, |n_i|^2 [B]) in float64 for x0, noise
    [B, C, H, W] (or [B, D])."""
    x = x0.flatten(1).double()  # [B, D]
    n = noise.flatten(1).double()  # [B, D]
    return x @ x.T, n @ x.T, n.square().sum(dim=1)


def _coefficients(points: list[NoiseLevel], name: str) -> Tensor:
    return torch.tensor([getattr(p, name) for p in points], dtype=torch.float64).view(-1, 1, 1)  # [L, 1, 1]


def log_posterior(grams: tuple[Tensor, Tensor, Tensor], points: list[NoiseLevel]) -> Tensor:
    """log w_ij [L, B, B] (rows: x_t,i; columns: candidate images j) at each of L noise levels; see the module
    docstring. |x_t,i - a x0_j|^2 = a^2 |x0_i - x0_j|^2 + 2 a s n_i . (x0_i - x0_j) + s^2 |n_i|^2.
    """
    gram, cross, sq_noise = grams
    a, s = _coefficients(points, "signal"), _coefficients(points, "noise")  # [L, 1, 1]
    sq_x = gram.diagonal()  # [B]
    sq_image = (sq_x[:, None] + sq_x[None, :] - 2.0 * gram).clamp_min(0.0)  # |x0_i - x0_j|^2, [B, B]
    sq_dist = a * a * sq_image + 2.0 * a * s * (cross.diagonal()[:, None] - cross) + s * s * sq_noise[:, None]
    return torch.log_softmax(-sq_dist.clamp_min(0.0) / (2.0 * s * s), dim=2)  # [L, B, B]


def batch_measures(grams: tuple[Tensor, Tensor, Tensor], points: list[NoiseLevel], dim: int) -> dict[str, Tensor]:
    """Per level and image [L, B]: `posterior` (w_ii), `correct` (1.0 where argmax_j w_ij == i) and
    `irreducible` (the best batch-posterior predictor's squared error per dimension; `dim` = D)."""
    gram = grams[0]
    log_w = log_posterior(grams, points)  # [L, B, B]
    w = log_w.exp()
    rows = torch.arange(gram.shape[0])
    # |x0_i - sum_j w_ij x0_j|^2 = |x0_i|^2 - 2 (w G)_ii + (w G w^T)_ii
    weighted = w @ gram  # [L, B, B]
    residual = (gram.diagonal() - 2.0 * weighted.diagonal(dim1=1, dim2=2)
                + (weighted * w).sum(dim=2)).clamp_min(0.0)  # [L, B]
    signal, noise = _coefficients(points, "signal")[:, 0], _coefficients(points, "noise")[:, 0]  # [L, 1]
    scale = (_coefficients(points, "target_data")[:, 0] - _coefficients(points, "target_noise")[:, 0] * signal
             / noise).square()  # [L, 1]
    return {"posterior": w[:, rows, rows], "correct": (log_w.argmax(dim=2) == rows).double(),
            "irreducible": scale * residual / dim}
