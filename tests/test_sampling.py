"""Seeded generation: per-image seeds, batch-size independence, the decode path, and `immiscible sample`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from conftest import TINY
from typer.testing import CliRunner

from immiscible_cli import networks, sampling, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.data import to_uint8

runner = CliRunner()


def random_net(cfg) -> torch.nn.Module:
    """The configured UNet with small random weights everywhere (a fresh UNet outputs exactly zero)."""
    net = networks.build_network(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return net


@pytest.mark.parametrize("preset, sampler", [("quickstart", "euler"), ("quickstart", "heun"),
                                             ("fmnist-knn", "ddpm"), ("fmnist-knn", "ddim")])
def test_image_i_does_not_depend_on_the_batch(tiny, preset, sampler):
    cfg = load_config(preset, tiny + ["data.source=embedded", "sample.eta=0.5"])
    net = random_net(cfg)
    seeds = [7, 3, 11, 0, 5]
    alone = torch.cat([sampling.generate(net, cfg, [s], sampler=sampler, steps=3, batch=1) for s in seeds])
    together = sampling.generate(net, cfg, seeds, sampler=sampler, steps=3, batch=2)
    assert alone.dtype == torch.uint8 and alone.shape == (5, 1, 16, 16)
    assert (alone.int() - together.int()).abs().max() <= 1  # equal up to a rounding flip at .5
    assert (alone == together).float().mean() > 0.999
    assert not torch.equal(alone[0], alone[1])  # different seeds, different images


class ZeroVelocity(torch.nn.Module):
    """Flow matching with v = 0: the sample is its starting noise, so decode's effect is visible exactly."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0])
def test_samples_are_decoded_by_the_assigner(tiny, scale):
    cfg = load_config("quickstart", tiny + [f"assigner.image_scale={scale}"])
    images = sampling.generate(ZeroVelocity(), cfg, [0, 1], sampler="euler", steps=2)
    noise = sampling.SeededNoise([0, 1], torch.device("cpu")).randn_like(torch.empty(2, 1, 16, 16))
    assert torch.equal(images, to_uint8((noise / scale).clamp(-1, 1)))


def test_parse_seeds():
    assert sampling.parse_seeds("0-3", None) == [0, 1, 2, 3]
    assert sampling.parse_seeds("5,1,9", None) == [5, 1, 9]
    assert sampling.parse_seeds("2-3,7", None) == [2, 3, 7]
    assert sampling.parse_seeds(None, 3) == [0, 1, 2]
    for bad in ("3-1", "a-b", "x", "-4"):
        with pytest.raises(sampling.UserError):
            sampling.parse_seeds(bad, None)
    with pytest.raises(sampling.UserError, match="not both"):
        sampling.parse_seeds("0-3", 4)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return trainer.train(load_config("quickstart", TINY), out_root=root)


def test_sample_command_writes_files_and_grid(trained_run, tmp_path):
    result = runner.invoke(app, ["sample", str(trained_run.path), "--seeds", "3-5", "--out", str(tmp_path / "imgs"),
                                 "--grid", str(tmp_path / "grid.png"), "--steps", "2", "--batch", "2"])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert files == ["seed000003.png", "seed000004.png", "seed000005.png"]
    assert Image.open(tmp_path / "imgs" / "seed000004.png").size == (16, 16)
    assert Image.open(tmp_path / "grid.png").size == (32, 32)  # 3 images on a 2 x 2 grid
    one = runner.invoke(app, ["sample", str(trained_run.path), "--seeds", "4", "--out", str(tmp_path / "one"),
                              "--steps", "2", "--ckpt", "0.016", "--no-ema"])
    assert one.exit_code == 0, one.output


@pytest.mark.parametrize("args, needle", [
    (["--num", "2"], "nothing to write"),
    (["--num", "2", "--grid", "g.png", "--sampler", "ddim"], "accepted: euler, heun"),
    (["--num", "2", "--grid", "g.png", "--ckpt", "77"], "no snapshot at 77"),
    (["--num", "2", "--grid", "g.png", "--class", "1"], "unconditional"),
    (["--seeds", "9-2", "--grid", "g.png"], "--seeds 9-2"),
])
def test_sample_errors_are_clean(trained_run, args, needle):
    result = runner.invoke(app, ["sample", str(trained_run.path), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_sample_of_a_non_run(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path), "--num", "1", "--grid", "g.png"])
    assert result.exit_code == 2 and "not a run directory" in result.output
