"""Immiscible noise in a diffusers training loop: UNet2DModel + DDPMScheduler, epsilon prediction.

    pip install 'immiscible[examples]'
    python examples/diffusers_ddpm.py --rule knn --k 8 --steps 5000       # the Fashion-MNIST images in the package
    python examples/diffusers_ddpm.py --images DIR --resolution 64 --rule linear --image-scale 2

A usual diffusers loop changes in one line (PAIRING below) and keeps to one rule (PITFALL): the noise that builds x_t
is the noise the network regresses on. Samples are divided by the image scale at the end (pairing.decode).
"""

from __future__ import annotations

import argparse
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from immiscible_cli import pairing


def diffusion_loss(unet, scheduler, x0: torch.Tensor, rule, generator: torch.Generator,
                   center: torch.Tensor | None = None, stats: dict | None = None) -> torch.Tensor:
    """The epsilon-prediction loss of one clean batch x0 [B, C, H, W] with noise paired by `rule`."""
    # PAIRING: the batch (multiplied by the rule's image_scale) and the noise paired with it, row by row.
    x0, noise = pairing.pair(x0, rule, generator, center=center, stats=stats)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator,
                      device=x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    pred = unet(x_t, t).sample
    # PITFALL: the target is `noise`, the paired noise that built x_t. A target built from unpaired noise (a fresh
    # torch.randn_like(x0), or the draw from before the pairing: linear assignment's unpermuted noise, KNN's first
    # candidate) asks the network for noise that x_t does not contain: the loss cannot reach its floor and the
    # pairing does nothing useful. (v-prediction: scheduler.get_velocity(x0, noise, t), of these same tensors.)
    return F.mse_loss(pred.float(), noise.float())


def train(unet, scheduler, batches: Iterable[torch.Tensor], rule, steps: int, lr: float = 2e-4, seed: int = 0,
          center: torch.Tensor | None = None, log_every: int = 0) -> list[float]:
    """`steps` AdamW steps on clean batches in [-1, 1]; returns the losses."""
    device = next(unet.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)  # the pairing's and the timesteps' draws
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    losses = []
    for step, x0 in zip(range(steps), batches):
        stats: dict = {}
        loss = diffusion_loss(unet, scheduler, x0.to(device), rule, generator, center, stats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {losses[-1]:.4f}, distance reduction {stats['pair_dist_reduction']:.3f}")
    return losses


@torch.no_grad()
def generate(unet, scheduler, count: int, rule, generator: torch.Generator, steps: int = 100,
             clip: tuple[float, float] | None = (-1.0, 1.0)) -> torch.Tensor:
    """`count` samples, back in the data's range: divided by the image scale, clipped to `clip` (pairing.decode)."""
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn((count, channels, size, size), generator=generator, device=unet.device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    return pairing.decode(x, rule, clip=clip)


def make_scheduler(rule) -> DDPMScheduler:
    # The scaled data lie in [-c, c]: the sampler's clipping of its x0 estimate must use that range, not [-1, 1].
    return DDPMScheduler(num_train_timesteps=1000, clip_sample_range=rule.image_scale)


def make_unet(resolution: int, channels: int) -> UNet2DModel:
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=2,
                       block_out_channels=(64, 128, 128),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def image_batches(folder: str | None, resolution: int, batch_size: int) -> tuple[torch.utils.data.DataLoader, int]:
    """Endlessly reshuffled batches in [-1, 1] of an image folder, or of the Fashion-MNIST images in the package
    (28 px padded to 32); and the channel count."""
    if folder:
        from torchvision import datasets, transforms

        to_tensor = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution),
                                        transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
        data = datasets.ImageFolder(folder, to_tensor)
        channels = 3
    else:
        from immiscible_cli.datasets import load_embedded

        images = torch.tensor(load_embedded()[0]).float().div(127.5).sub(1)[:, None]  # [N, 1, 28, 28]
        data = torch.utils.data.TensorDataset(F.pad(images, (2, 2, 2, 2), value=-1.0))
        channels = 1
    return torch.utils.data.DataLoader(data, batch_size, shuffle=True, drop_last=True, num_workers=0), channels


def forever(loader) -> Iterator[torch.Tensor]:
    while True:
        for batch in loader:
            yield batch[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="an image folder (ImageFolder layout); default: Fashion-MNIST")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rule", default="knn", choices=pairing.RULES)
    parser.add_argument("--k", type=int, help="knn: candidates per image (default 8)")
    parser.add_argument("--knn-score", choices=("l2", "direction", "centred"))
    parser.add_argument("--image-scale", type=float)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--out", default="samples.png")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rule = pairing.make_rule(args.rule, k=args.k, knn_score=args.knn_score, image_scale=args.image_scale)
    loader, channels = image_batches(args.images, args.resolution, args.batch_size)
    # knn_score="centred" scores against the data mean (in the data's space: pair applies the image scale).
    center = pairing.data_mean(loader, max_samples=10_000).to(device) if pairing.needs_center(rule) else None
    unet, scheduler = make_unet(args.resolution, channels).to(device), make_scheduler(rule)
    train(unet, scheduler, forever(loader), rule, args.steps, center=center, log_every=100)
    samples = generate(unet, scheduler, 64, rule, torch.Generator(device).manual_seed(1), args.sample_steps)
    from torchvision.utils import save_image

    save_image(samples * 0.5 + 0.5, args.out, nrow=8)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
