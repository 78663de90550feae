"""The scripts in examples/ (issue 26, part B), each run on a tiny model for a few steps on the CPU: the diffusers
loop, plain PyTorch flow matching and the latent loop with a tiny random AutoencoderKL (nothing is downloaded).
The regression target of each loop is the paired noise: a copy of the loop with the known pitfall (a target from
the unpaired noise) is caught by the same check."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from immiscible_cli import pairing

pytest.importorskip("diffusers", reason="the examples extra installs diffusers: pip install '.[examples]'")
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield SimpleNamespace(**{name: importlib.import_module(name)
                                 for name in ("diffusers_ddpm", "flow_matching", "latent_diffusers")})
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_unet(size: int = 8, channels: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def tiny_vae(channels: int = 1) -> AutoencoderKL:
    """A random AutoencoderKL: 8 px images -> 2 latent channels at 4 px."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=2, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def images(count: int = 8, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand((count, 1, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


class Oracle(nn.Module):
    """A 'network' that predicts `answer` whatever its input, and records what it was given."""

    def __init__(self, answer: torch.Tensor):
        super().__init__()
        self.answer, self.weight = answer, nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        self.x_t, self.t = x, t
        out = self.answer + self.weight
        return SimpleNamespace(sample=out) if x.dim() == 4 else out


def unpaired_target_loss(unet, scheduler, x0, rule, generator, center=None, stats=None):
    """The pitfall: x_t from the paired noise, the target from the draw before the pairing (unpermuted)."""
    before = generator.get_state()
    x0, noise = pairing.pair(x0, rule, generator)
    unpaired = torch.randn(x0.shape, generator=torch.Generator().set_state(before))
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    return nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, unpaired)


def regresses_the_paired_noise(loss_fn, rule) -> bool:
    """Whether a network that outputs the paired noise has zero loss, x_t being built from that noise."""
    x0, scheduler = images(), DDPMScheduler(num_train_timesteps=50)
    scaled, noise = pairing.pair(x0, rule, torch.Generator().manual_seed(3))
    oracle = Oracle(noise)
    loss = loss_fn(oracle, scheduler, x0, rule, torch.Generator().manual_seed(3))
    return loss.item() == 0 and torch.equal(oracle.x_t, scheduler.add_noise(scaled, noise, oracle.t))


@pytest.mark.parametrize("rule", ["linear", "knn"])
def test_the_diffusers_target_is_the_paired_noise_and_the_pitfall_is_caught(examples, rule):
    rule = pairing.make_rule(rule, image_scale=2.0)
    assert regresses_the_paired_noise(examples.diffusers_ddpm.diffusion_loss, rule)
    assert not regresses_the_paired_noise(unpaired_target_loss, rule)


def test_the_flow_target_is_built_from_the_paired_noise(examples):
    data, rule = images().flatten(1), pairing.make_rule("linear")
    x1, x0 = pairing.pair(data, rule, torch.Generator().manual_seed(3))
    oracle = Oracle(x1 - x0)
    assert examples.flow_matching.flow_loss(oracle, data, rule, torch.Generator().manual_seed(3)).item() == 0
    t = oracle.t[:, None]
    assert torch.equal(oracle.x_t, t * x1 + (1 - t) * x0)


def test_the_diffusers_loop_trains_and_samples_in_the_data_range(examples):
    ddpm, unet = examples.diffusers_ddpm, tiny_unet()
    rule = pairing.make_rule("knn", k=3, knn_score="centred", image_scale=2.0)
    scheduler, data = ddpm.make_scheduler(rule), images()
    before = [p.detach().clone() for p in unet.parameters()]
    losses = ddpm.train(unet, scheduler, iter([data[:4], data[4:]]), rule, steps=2, center=pairing.data_mean(data))
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    samples = ddpm.generate(unet, scheduler, 2, rule, torch.Generator().manual_seed(1), steps=2)
    assert samples.shape == (2, 1, 8, 8) and samples.abs().max() <= 1


def test_the_diffusers_script_runs_on_the_packaged_images(examples, monkeypatch, tmp_path):
    monkeypatch.setattr(examples.diffusers_ddpm, "make_unet", lambda size, channels: tiny_unet(size, channels))
    monkeypatch.setattr(sys, "argv", ["diffusers_ddpm.py", "--rule", "linear", "--image-scale", "2", "--steps", "2",
                                      "--batch-size", "4", "--sample-steps", "2", "--out", str(tmp_path / "s.png")])
    examples.diffusers_ddpm.main()
    assert (tmp_path / "s.png").stat().st_size > 0


def test_plain_flow_matching_learns_the_eight_gaussians(examples):
    flow = examples.flow_matching
    torch.manual_seed(0)
    net, rule = flow.VelocityNet(2, hidden=64), pairing.make_rule("linear")
    losses = flow.train(net, flow.eight_gaussians, rule, steps=300, batch_size=64, lr=3e-3)
    assert sum(losses[-30:]) < sum(losses[:30])
    radius = flow.generate(net, 256, 2, rule, torch.Generator().manual_seed(1), steps=20).norm(dim=1)
    noise_radius = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)).norm(dim=1)
    assert (radius.mean() - 2).abs() < (noise_radius.mean() - 2).abs() / 2  # on the circle, not on the noise


def test_the_latent_loop_trains_on_scaled_latents_and_decodes(examples):
    latent, vae = examples.latent_diffusers, tiny_vae().eval()
    data = images()
    batches = list(latent.latent_batches(vae, [data[:4], data[4:]], torch.Generator().manual_seed(2)))
    raw = vae.encode(data[:4]).latent_dist.sample(torch.Generator().manual_seed(2))
    assert batches[0].shape == (4, 2, 4, 4) and torch.allclose(batches[0], raw * vae.config.scaling_factor)
    unet, rule, scheduler = tiny_unet(4, 2), pairing.make_rule("knn", k=4), latent.latent_scheduler()
    losses = examples.diffusers_ddpm.train(unet, scheduler, iter(batches), rule, steps=2)
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    sampled = examples.diffusers_ddpm.generate(unet, scheduler, 2, rule, torch.Generator().manual_seed(1), steps=2,
                                               clip=None)
    decoded = latent.decode_latents(vae, sampled)
    assert decoded.shape == (2, 1, 8, 8) and decoded.abs().max() <= 1


def test_the_latent_script_runs_with_a_local_vae_folder(examples, monkeypatch, tmp_path):
    from PIL import Image

    tiny_vae(channels=3).save_pretrained(tmp_path / "vae")  # ImageFolder reads RGB
    folder = tmp_path / "images" / "all"
    folder.mkdir(parents=True)
    for i, image in enumerate(images(4)):
        Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy()).convert("RGB").save(folder / f"{i}.png")
    monkeypatch.setattr(examples.latent_diffusers, "make_unet", lambda size, channels: tiny_unet(size, channels))
    monkeypatch.setattr(sys, "argv", ["latent_diffusers.py", "--vae", str(tmp_path / "vae"), "--images",
                                      str(tmp_path / "images"), "--resolution", "8", "--rule", "knn", "--k", "3",
                                      "--knn-score", "centred", "--steps", "2", "--batch-size", "2",
                                      "--sample-steps", "2", "--out", str(tmp_path / "s.png")])
    examples.latent_diffusers.main()
    assert (tmp_path / "s.png").stat().st_size > 0
