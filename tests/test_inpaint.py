"""Image editing: named masks, the sampler hook, the known region kept exactly, seeds, and `sample --inpaint`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import TINY
from typer.testing import CliRunner

from immiscible_cli import editing, networks, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import DDPMObjective, FlowObjective, load_config
from immiscible_cli.objectives import DDPM, Flow

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    """These 16 px networks run faster on one thread than on two sharing a busy machine (measured 15x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_net(cfg) -> torch.nn.Module:
    """The configured UNet with small random weights everywhere (a fresh UNet outputs exactly zero)."""
    net = networks.build_network(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return net


class OutwardEps(torch.nn.Module):
    """A cheap analytic net (-4 x), for tests of the samplers' loop rather than of a network."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        return -4.0 * x


def test_named_masks_have_their_shape_and_area():
    center = editing.named_mask("center", 16)
    assert center.shape == (1, 16, 16) and center.sum() == 8 * 8 and center[0, 4:12, 4:12].all()
    left = editing.named_mask("left-half", 16)
    assert left.sum() == 16 * 8 and left[0, :, :8].all() and not left[0, :, 8:].any()
    border = editing.named_mask("outpaint-8px", 32)
    assert border.sum() == 32 * 32 - 16 * 16 and not border[0, 8:24, 8:24].any() and border[0, 0].all()
    assert editing.named_mask("outpaint-2px", 16).sum() == 16 * 16 - 12 * 12
    assert editing.named_mask("middle", 16) is None
    with pytest.raises(editing.EditError, match="--mask outpaint-8px"):
        editing.named_mask("outpaint-8px", 16)  # nothing would be kept


@pytest.mark.parametrize("objective, sampler, steps, resample, levels", [
    (DDPM, "ddim", 3, 0, "ddpm"), (DDPM, "ddpm", 3, 2, "ddpm"),
    (Flow, "euler", 3, 0, [1 / 3, 2 / 3, 1.0]), (Flow, "heun", 3, 1, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0]),
])
def test_after_step_sees_each_level_and_resample_repeats_steps(tiny, objective, sampler, steps, resample, levels):
    cfg = load_config("fmnist-knn" if objective is DDPM else "quickstart", tiny)
    method = objective(cfg.objective)
    seen = []
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    method.sample(OutwardEps(), noise, sampler=sampler, steps=steps, randn=torch.randn_like, resample=resample,
                  after_step=lambda x, level: seen.append(level) or x)
    if levels == "ddpm":  # abar at the next timestep, 1.0 after the last; every step but the last resampled
        taus = method.sampling_timesteps(steps)
        nexts = [method.alpha_bar[tau].item() for tau in taus[1:]]
        levels = [level for level in nexts for _ in range(1 + resample)] + [1.0]
    assert seen == pytest.approx(levels, abs=1e-12)


@pytest.mark.parametrize("objective, sampler", [(DDPM, "ddpm"), (DDPM, "ddim"), (Flow, "heun")])
def test_identity_hook_leaves_samples_bit_identical(tiny, objective, sampler):
    cfg = load_config("fmnist-knn" if objective is DDPM else "quickstart", tiny)
    method = objective(cfg.objective)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(**hook):
        generator = torch.Generator().manual_seed(5)
        return method.sample(OutwardEps(), noise, sampler=sampler, steps=4, clip_x0=1.0,
                             randn=lambda x: torch.randn(x.shape, generator=generator), **hook)

    assert torch.equal(run(), run(after_step=lambda x, level: x))


@pytest.mark.parametrize("objective, level_from, level_to", [(DDPM, 0.8, 0.3), (Flow, 0.75, 0.25), (Flow, 1.0, 0.0)])
def test_renoise_keeps_the_marginal_at_the_earlier_level(tiny, objective, level_from, level_to):
    # x at level_from built from data d and noise; renoised to level_to it must be d's x_t there: the residual
    # after removing the data term is N(0, sd^2) (sd = sqrt(1 - abar) or 1 - t), up to sampling error (n = 2e5).
    generator = torch.Generator().manual_seed(0)
    data = torch.rand(200_000, generator=generator) * 2 - 1
    if objective is DDPM:
        x = level_from ** 0.5 * data + (1 - level_from) ** 0.5 * torch.randn(200_000, generator=generator)
        signal, spread = level_to ** 0.5, (1 - level_to) ** 0.5
    else:
        x = level_from * data + (1 - level_from) * torch.randn(200_000, generator=generator)
        signal, spread = level_to, 1 - level_to
    back = objective.renoise(x, level_from, level_to, lambda like: torch.randn(like.shape, generator=generator))
    residual = (back - signal * data) / spread
    assert abs(residual.mean().item()) < 0.01 and abs(residual.std().item() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([residual, data]))[0, 1].item()) < 0.01


@pytest.mark.parametrize("objective, level, signal, spread", [(DDPM(DDPMObjective()), 0.36, 0.6, 0.8),
                                                              (Flow(FlowObjective()), 0.25, 0.25, 0.75)])
def test_reimpose_puts_the_known_image_at_the_level(objective, level, signal, spread):
    # known = 0.5 everywhere, left half generated: the right half becomes signal * 0.5 + spread * N(0, 1) (seeded),
    # the left half is x untouched.
    known, fill = torch.full((1, 1, 256, 256), 0.5), editing.named_mask("left-half", 256).unsqueeze(0)
    x = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(9))

    def draws():  # a fresh stream seeded 4, as each edit's SeededNoise
        generator = torch.Generator().manual_seed(4)
        return lambda like: torch.randn(like.shape, generator=generator)

    out = editing.Reimpose(objective, known, fill, draws())(x, level)
    assert torch.equal(out[..., :128], x[..., :128])
    residual = (out[..., 128:] - signal * 0.5) / spread
    assert abs(residual.mean().item()) < 0.02 and abs(residual.std().item() - 1) < 0.02
    assert torch.equal(out, editing.Reimpose(objective, known, fill, draws())(x, level))  # the stream decides the noise
    assert torch.equal(editing.Reimpose(objective, known, fill, draws())(x, 1.0)[..., 128:], known[..., 128:])


def square_image(channels: int = 1) -> torch.Tensor:
    """uint8 [1, C, 16, 16]: a diagonal ramp, far from what an untrained network makes."""
    ramp = torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)  # [16, 16]
    return (ramp * 8).clamp(0, 255).to(torch.uint8).expand(1, channels, 16, 16).clone()


@pytest.mark.parametrize("preset, sampler, settings, resample", [
    ("fmnist-knn", "ddim", ["assigner.image_scale=2"], 0), ("fmnist-knn", "ddpm", [], 1),
    ("quickstart", "euler", ["assigner.image_scale=2"], 0), ("quickstart", "heun", [], 1),
    ("quickstart", "euler", ["model.num_classes=3"], 0),
])
def test_known_region_kept_and_seeds_reproduce(tiny, preset, sampler, settings, resample):
    cfg = load_config(preset, tiny + ["data.source=embedded", *settings])
    net, known = random_net(cfg), square_image()
    fill = editing.named_mask("center", 16).unsqueeze(0)  # [1, 1, 16, 16]
    options = dict(sampler=sampler, steps=3, resample=resample, guidance=2.0,
                   label=1 if cfg.model.num_classes else None)
    edits = editing.inpaint(net, cfg, known, fill, [0, 1, 0], batch=2, **options)  # [1, 3, 1, 16, 16]
    assert edits.shape == (1, 3, 1, 16, 16) and edits.dtype == torch.uint8
    keep = ~fill[0].expand(1, 16, 16)
    deviation = (edits[0].int() - known.int()).abs()  # [3, 1, 16, 16]
    assert deviation[:, keep].max() == 0  # tolerance: 0 uint8 levels after decode
    assert deviation[:, ~keep].float().mean() > 4  # the hole is generated, not copied from the input
    assert torch.equal(edits[0, 0], edits[0, 2])  # the same seed, the same edit (batch 2 then a batch of 1)
    assert (edits[0, 0].int() - edits[0, 1].int())[:, fill[0, 0]].abs().max() > 8  # another seed, another fill
    alone = editing.inpaint(net, cfg, known, fill, [1], batch=1, **options)
    assert (alone[0, 0].int() - edits[0, 1].int()).abs().max() <= 1  # independent of the batch, up to rounding
    if cfg.model.num_classes:
        other = editing.inpaint(net, cfg, known, fill, [1], batch=1, **{**options, "label": 2})
        assert not torch.equal(other[0, 0], alone[0, 0])  # the class reaches the network


def test_dopri5_is_refused_naming_the_sampler(tiny):
    cfg = load_config("quickstart", tiny)
    with pytest.raises(editing.EditError, match="--sampler dopri5"):
        editing.inpaint(OutwardEps(), cfg, square_image(), editing.named_mask("center", 16).unsqueeze(0), [0],
                        sampler="dopri5", steps=2)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)  # as _one_thread: a module fixture is made before the function fixtures
    return trainer.train(load_config("quickstart", TINY), out_root=root)


def write_png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def test_sample_inpaint_writes_edits_and_grid(trained_run, tmp_path):
    # A 20 x 24 RGB photo reaches the grey 16 px run as its data did (centre crop, resize, luma); mask file: white =
    # generate, the top-left 6 x 6 block here.
    photo = write_png(tmp_path / "photo.png", np.random.default_rng(0).integers(0, 256, (20, 24, 3)))
    drawn = np.zeros((16, 16), np.uint8)
    drawn[:6, :6] = 255
    mask = write_png(tmp_path / "mask.png", drawn)
    result = runner.invoke(app, ["sample", str(trained_run.path), "--inpaint", "--image", str(photo), "--mask",
                                 str(mask), "--seeds", "3-4", "--steps", "2", "--out", str(tmp_path / "edits")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "edits").iterdir()) == \
        ["inpaint-grid.png", "photo-seed000003.png", "photo-seed000004.png"]
    assert Image.open(tmp_path / "edits" / "inpaint-grid.png").size == (4 * 16, 16)  # input, mask, 2 edits
    _, known, fill = editing.load_inputs(photo, str(mask), trained_run.config().data)
    assert fill.sum() == 36 and fill[0, 0, :6, :6].all()
    edit = torch.from_numpy(np.array(Image.open(tmp_path / "edits" / "photo-seed000004.png")))  # [16, 16]
    keep = ~fill[0, 0]
    assert torch.equal(edit[keep], known[0, 0][keep])  # the known pixels are the input's, exactly
    named = runner.invoke(app, ["sample", str(trained_run.path), "--inpaint", "--image", str(tmp_path),
                                "--mask", "outpaint-2px", "--steps", "2", "--grid", str(tmp_path / "g.png")])
    assert named.exit_code == 0, named.output  # a folder (2 images), the default 4 seeds, only the grid
    assert Image.open(tmp_path / "g.png").size == (6 * 16, 2 * 16)


@pytest.mark.parametrize("args, needle", [
    (["--image", "photo.png", "--num", "1"], "--image edits images: add --inpaint"),
    (["--inpaint", "--num", "1"], "--inpaint needs --image"),
    (["--inpaint", "--image", "gone.png"], "--image gone.png: no such file or folder"),
    (["--inpaint", "--image", "notes.png"], "--image notes.png: cannot read it as an image"),
    (["--inpaint", "--image", "photo.png", "--mask", "small.png"], "--mask small.png: 8x8 px; expected 16x16"),
    (["--inpaint", "--image", "photo.png", "--mask", "middle"], "--mask middle: not a file nor a named mask"),
    (["--inpaint", "--image", "photo.png", "--mask", "outpaint-8px"], "--mask outpaint-8px: the border"),
    (["--inpaint", "--image", "photo.png", "--sampler", "dopri5"], "--sampler dopri5"),
])
def test_inpaint_errors_are_clean(trained_run, tmp_path, args, needle):
    write_png(tmp_path / "photo.png", np.zeros((16, 16)))
    write_png(tmp_path / "small.png", np.zeros((8, 8)))
    (tmp_path / "notes.png").write_text("not a picture")
    result = runner.invoke(app, ["sample", str(trained_run.path), *args, "--out", str(tmp_path / "edits")])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "edits").exists()  # nothing written
