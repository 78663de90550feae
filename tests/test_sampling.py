"""Seeded generation: per-image seeds, batch-size independence, the decode path, and `immiscible sample`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from conftest import TINY
from typer.testing import CliRunner

from immiscible_cli import generation, networks, sampling, trainer
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
    alone = torch.cat([generation.generate(net, cfg, [s], sampler=sampler, steps=3, batch=1) for s in seeds])
    together = generation.generate(net, cfg, seeds, sampler=sampler, steps=3, batch=2)
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
    images = generation.generate(ZeroVelocity(), cfg, [0, 1], sampler="euler", steps=2)
    noise = generation.SeededNoise([0, 1], torch.device("cpu")).randn_like(torch.empty(2, 1, 16, 16))
    assert torch.equal(images, to_uint8((noise / scale).clamp(-1, 1)))


class OutwardEps(torch.nn.Module):
    """Predicts -4 x: as DDPM's eps, the predicted x0 x (1 + 4 sqrt(1 - abar)) / sqrt(abar) lies far outside the
    data; as a flow velocity, x(1) = x(0) e^-4."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        return -4.0 * x


def test_generate_passes_the_sampling_options(tiny, monkeypatch):
    from immiscible_cli.objectives import DDPM, Flow

    seen = []
    for cls in (DDPM, Flow):
        original = cls.sample
        monkeypatch.setattr(cls, "sample", lambda self, *a, _o=original, **kw: seen.append(kw) or _o(self, *a, **kw))
    ddpm = load_config("fmnist-knn", tiny + ["assigner.image_scale=2", "sample.ddim_grid=stride",
                                             "sample.ode_atol=1e-3", "sample.ode_rtol=1e-2"])
    generation.generate(OutwardEps(), ddpm, [0], sampler="ddim", steps=2)
    assert (seen[-1]["clip_x0"], seen[-1]["grid"], seen[-1]["atol"], seen[-1]["rtol"]) == (2.0, "stride", 1e-3, 1e-2)
    ddpm.sample.clip_x0 = False
    generation.generate(OutwardEps(), ddpm, [0], sampler="ddim", steps=2)
    assert seen[-1]["clip_x0"] is None
    flow = load_config("quickstart", tiny + ["sample.ode_atol=1e-5", "sample.ode_rtol=1e-6"])
    generation.generate(ZeroVelocity(), flow, [0], sampler="dopri5", steps=2)
    assert (seen[-1]["atol"], seen[-1]["rtol"], seen[-1]["clip_x0"]) == (1e-5, 1e-6, 1.0)  # flow ignores the clip


class PointMassEps(torch.nn.Module):
    """The exact DDPM eps for data that is always `point` (model space): eps = (x - sqrt(abar) point) / sqrt(1 - abar)."""

    def __init__(self, point, alpha_bar):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.point, self.alpha_bar = point, alpha_bar

    def forward(self, x, t, labels=None):
        abar = self.alpha_bar[t.long()].view(-1, 1, 1, 1)
        return ((x.double() - abar.sqrt() * self.point) / (1 - abar).sqrt()).float()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_clip_at_the_image_scale_keeps_decoded_samples_valid(tiny, sampler):
    # Image scale 2: the data live in [-2, 2] in model space. The clip must be at 2, where it leaves this point
    # (values up to 1.9) alone; a clip at 1 would flatten every pixel beyond 1 (decoded 0.5, uint8 191).
    from immiscible_cli.objectives import DDPM

    cfg = load_config("fmnist-knn", tiny + ["assigner.image_scale=2"])
    assert cfg.sample.clip_x0
    point = torch.linspace(-1.9, 1.9, 256, dtype=torch.float64).view(1, 1, 16, 16)
    net = PointMassEps(point, DDPM(cfg.objective).alpha_bar)
    images = generation.generate(net, cfg, [0, 1], sampler=sampler, steps=3)
    expected = to_uint8((point / 2).float()).expand_as(images)
    assert (images.int() - expected.int()).abs().max() <= 1  # up to a rounding flip at .5
    assert images.min() <= 7 and images.max() >= 248  # the whole range, none of it clipped away


# fmnist-knn samples on tqch's strided grid: arange(0, 1000, 1000 // 3) has 4 entries, so 3 steps cost 4 calls.
@pytest.mark.parametrize("preset, sampler, per_batch", [("fmnist-knn", "ddim", 4), ("fmnist-knn", "ddpm", 4),
                                                        ("quickstart", "euler", 3), ("quickstart", "heun", 5),
                                                        ("quickstart", "dopri5", None)])
def test_generate_records_the_nfe_of_each_batch(tiny, preset, sampler, per_batch):
    cfg = load_config(preset, tiny)
    net = generation.CountingNet(OutwardEps())  # a cheap analytic net: the counts do not depend on the net
    nfe = []
    images = generation.generate(net, cfg, [0, 1, 2, 3, 4], sampler=sampler, steps=3, batch=2, nfe=nfe)
    assert images.shape == (5, 1, 16, 16) and len(nfe) == 3  # batches of 2, 2, 1
    assert sum(nfe) == net.calls  # an outer counter sees the same calls
    if per_batch is not None:
        assert nfe == [per_batch] * 3
    else:
        assert min(nfe) >= 8  # dopri5: its initial-step probe plus at least one 6-stage step


def test_dopri5_through_generate(tiny):
    cfg = load_config("quickstart", tiny)
    images = generation.generate(ZeroVelocity(), cfg, [0, 1], sampler="dopri5", steps=2)
    noise = generation.SeededNoise([0, 1], torch.device("cpu")).randn_like(torch.empty(2, 1, 16, 16))
    assert torch.equal(images, to_uint8(noise.clamp(-1, 1)))  # v = 0: the sample is its noise


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


def test_sample_set_changes_how_images_are_drawn(trained_run, tmp_path):
    """`sample --set sample.start_std=...` draws from the same network with a smaller start; the default is
    unchanged by the option existing (same seed, same file bytes), and config.yaml is not touched."""
    config_before = (trained_run.path / "config.yaml").read_bytes()

    def one(name: str, *extra: str):
        result = runner.invoke(app, ["sample", str(trained_run.path), "--seeds", "4", "--out", str(tmp_path / name),
                                     "--steps", "2", *extra])
        assert result.exit_code == 0, result.output
        return torch.tensor(list(Image.open(tmp_path / name / "seed000004.png").getdata()))

    plain, again, small = one("a"), one("b"), one("c", "--set", "sample.start_std=0.25")
    assert torch.equal(plain, again)
    assert not torch.equal(plain, small)
    assert (trained_run.path / "config.yaml").read_bytes() == config_before


@pytest.mark.parametrize("args, needle", [
    (["--num", "2", "--grid", "g.png", "--set", "model.channels=8"], "'model.channels' cannot change when sampling"),
    (["--num", "2", "--grid", "g.png", "--set", "sample.start_std=0"], "sample.start_std"),
    (["--num", "2", "--grid", "g.png", "--set", "sample.guidance=2"], "this run is unconditional"),
    (["--num", "2", "--grid", "g.png", "--guidance", "2"], "--guidance 2: this run is unconditional"),
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
