"""Is vanilla's PC1 variance of 1.056 in `analyze` (data mode, fmnist-cpu, seed 0) an artefact of seeding the
per-batch generators with consecutive integers (batch_seed(0, b) = b for b = 0..99)?

    python docs/results/fashion-mnist/checks/pc1_seed_blocks.py      # about a minute on one core

Draws 128 x 784 standard normal noises per generator, as vanilla does in data mode, and prints the projection
variance along the data directions `analyze` uses (data mean, PC1-3 of the Fashion-MNIST training set):
- the block the analysis used (seeds 0..99);
- 30 blocks of 100 consecutive seeds (k*100 .. k*100+99) and 30 blocks of 100 widely spaced seeds: mean and sd of
  the block variances. If consecutive seeding inflated the variance, the consecutive blocks' mean would sit above 1.
Needs the Fashion-MNIST training set (DATA.md).
"""

import torch

from immiscible_cli.analysis.data_mode import data_directions
from immiscible_cli.config import load_config
from immiscible_cli.data import load_images

BATCH, DIM, BLOCK, BLOCKS = 128, 784, 100, 30


def block_variance(seeds, directions: torch.Tensor) -> torch.Tensor:
    noise = torch.cat([torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return (noise.double() @ directions).var(dim=0)  # [q]


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config("fmnist-cpu")
    names, directions = data_directions(load_images(cfg.data), cfg.data.hflip)
    print("directions:", ", ".join(names))
    used = block_variance(range(BLOCK), directions)
    print("seeds 0..99 (the analysis):", " ".join(f"{v:.4f}" for v in used.tolist()))
    for label, seeds_of in (("consecutive", lambda k: range(k * BLOCK, (k + 1) * BLOCK)),
                            ("spaced", lambda k: [k * 7919 + i * 1_000_003 for i in range(BLOCK)])):
        values = torch.stack([block_variance(seeds_of(k), directions) for k in range(1, BLOCKS + 1)])
        mean, sd = values.mean(dim=0), values.std(dim=0)
        print(f"{BLOCKS} {label} blocks: mean", " ".join(f"{v:.4f}" for v in mean.tolist()),
              "| sd", " ".join(f"{v:.4f}" for v in sd.tolist()))
    z = (used - 1.0) / values.std(dim=0)
    print("seeds 0..99 in sd units of a block:", " ".join(f"{v:+.1f}" for v in z.tolist()))


if __name__ == "__main__":
    main()
