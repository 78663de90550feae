"""Immiscible noise for latent diffusion: the diffusers loop of diffusers_ddpm.py, on AutoencoderKL latents.

    pip install 'immiscible[examples]'
    python examples/latent_diffusers.py --vae PATH/TO/VAE --images DIR --resolution 256 --rule knn --k 64

--vae is a local diffusers AutoencoderKL folder (config.json and weights, e.g. the `vae` folder of a Stable
Diffusion checkpoint you already have); nothing is downloaded. Images are encoded batch by batch, scaled by the
VAE's scaling factor (after its shift factor, if it has one), paired and trained on exactly as pixels are: pairing
works on any [B, C, h, w] latents. Generated latents are divided by the image scale (not clipped: latents are not in
[-1, 1]), unscaled and decoded by the same VAE.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch
from diffusers import AutoencoderKL, DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers_ddpm import forever, generate, image_batches, make_unet, train  # noqa: E402

from immiscible_cli import pairing  # noqa: E402


def vae_shift_scale(vae: AutoencoderKL) -> tuple[float, float]:
    """The VAE's latent normalisation: model latents = (raw - shift) * scale (SD: shift 0, scale 0.18215)."""
    return getattr(vae.config, "shift_factor", None) or 0.0, vae.config.scaling_factor


@torch.no_grad()
def latent_batches(vae: AutoencoderKL, batches: Iterable[torch.Tensor],
                   generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Each batch of images in [-1, 1] as model latents [B, C, h, w] (a sample of the VAE's posterior)."""
    shift, scale = vae_shift_scale(vae)
    for images in batches:
        raw = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        yield ((raw - shift) * scale).float()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Model latents (already divided by the image scale: pairing.decode) back to images in [-1, 1]."""
    shift, scale = vae_shift_scale(vae)
    return vae.decode((latents / scale + shift).to(vae.dtype)).sample.float().clamp(-1, 1)


def latent_scheduler() -> DDPMScheduler:
    # Latents are not in [-1, 1]: the sampler must not clip its x0 estimate.
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="a local diffusers AutoencoderKL folder")
    parser.add_argument("--images", required=True, help="an image folder (ImageFolder layout)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rule", default="knn", choices=pairing.RULES)
    parser.add_argument("--k", type=int, help="knn: candidates per latent (default 8; the improved paper: 64)")
    parser.add_argument("--knn-score", choices=("l2", "direction", "centred"))
    parser.add_argument("--image-scale", type=float)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--out", default="samples.png")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(device).eval().requires_grad_(False)
    rule = pairing.make_rule(args.rule, k=args.k, knn_score=args.knn_score, image_scale=args.image_scale)
    loader, _ = image_batches(args.images, args.resolution, args.batch_size)
    encoder_generator = torch.Generator(device).manual_seed(2)
    center = None
    if pairing.needs_center(rule):  # the latents' mean, over one pass of up to 10,000 encoded images
        epoch = (images for images, _ in loader)
        center = pairing.data_mean(latent_batches(vae, epoch, encoder_generator), max_samples=10_000)
    latents = latent_batches(vae, forever(loader), encoder_generator)
    first = next(latents)
    unet = make_unet(first.shape[-1], first.shape[1]).to(device)
    scheduler = latent_scheduler()
    train(unet, scheduler, itertools.chain([first], latents), rule, args.steps, center=center, log_every=100)
    sampled = generate(unet, scheduler, 16, rule, torch.Generator(device).manual_seed(1), args.sample_steps,
                       clip=None)
    from torchvision.utils import save_image

    save_image(decode_latents(vae, sampled) * 0.5 + 0.5, args.out, nrow=4)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
