"""Immiscible noise in a plain PyTorch flow-matching loop (the torchcfm convention), on low-dimensional data.

    python examples/flow_matching.py --rule linear --steps 3000     # 2-D data: eight Gaussians on a circle

torchcfm's names: x0 is the source (noise), x1 the data, x_t = t x1 + (1 - t) x0, and the network regresses the
velocity x1 - x0. Pairing chooses which noise x0 goes with each data point x1; everything after it uses that pair.
The same loop takes any [B, ...] data (vectors, action trajectories [B, T, D], images): pairing.pair flattens each
sample internally.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from immiscible_cli import pairing


class VelocityNet(nn.Module):
    """v(x_t, t) for vectors [B, D]: an MLP with t as an extra input."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


def flow_loss(net: nn.Module, data: torch.Tensor, rule, generator: torch.Generator,
              stats: dict | None = None) -> torch.Tensor:
    """The conditional flow-matching loss of one batch of data [B, D] with source noise paired by `rule`."""
    # PAIRING: x1 is the data (times the rule's image_scale), x0 the noise paired with it, row by row.
    x1, x0 = pairing.pair(data, rule, generator, stats=stats)
    t = torch.rand(x1.shape[0], generator=generator, device=x1.device)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    # PITFALL: the target is built from the same x0 as x_t; never from a fresh randn_like(x1) or the unpaired draw.
    target = x1 - x0
    return (net(x_t, t) - target).square().mean()


def train(net: nn.Module, sample_data, rule, steps: int, batch_size: int = 256, lr: float = 1e-3,
          seed: int = 0) -> list[float]:
    """`steps` Adam steps; `sample_data(n, generator)` gives a fresh batch [n, D]. Returns the losses."""
    device = next(net.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)  # the data's, the pairing's and the times' draws
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = flow_loss(net, sample_data(batch_size, generator), rule, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def generate(net: nn.Module, count: int, dim: int, rule, generator: torch.Generator, steps: int = 100) -> torch.Tensor:
    """Euler from N(0, I) at t = 0 to the data at t = 1, then divided by the image scale (no clipping: the data
    are not in [-1, 1])."""
    device = next(net.parameters()).device
    x = torch.randn((count, dim), generator=generator, device=device)
    for i in range(steps):
        t = torch.full((count,), i / steps, device=device)
        x = x + net(x, t) / steps
    return pairing.decode(x, rule, clip=None)


def eight_gaussians(count: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 2]: a mixture of eight Gaussians (sd 0.1) centred on a circle of radius 2."""
    device = generator.device
    angle = torch.randint(0, 8, (count,), generator=generator, device=device) * (math.pi / 4)
    centres = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + 0.1 * torch.randn((count, 2), generator=generator, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="linear", choices=pairing.RULES)
    parser.add_argument("--k", type=int, help="knn: candidates per point (default 8)")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rule = pairing.make_rule(args.rule, k=args.k)
    net = VelocityNet(2).to(device)
    losses = train(net, eight_gaussians, rule, args.steps)
    samples = generate(net, 2000, 2, rule, torch.Generator(device).manual_seed(1))
    radius = samples.norm(dim=1)
    print(f"final loss {sum(losses[-100:]) / len(losses[-100:]):.4f}; sample radius {radius.mean():.3f} "
          f"+- {radius.std():.3f} (data: 2.0 +- 0.1)")


if __name__ == "__main__":
    main()
