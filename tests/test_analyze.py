"""`immiscible analyze`: the batch-posterior math against brute force, data mode's pinned properties, run mode on a
tiny trained run, the written files and the command's errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY, StubNetwork
from immiscible_cli.analysis import data_mode, run_mode
from immiscible_cli.analysis.levels import noise_level, parse_levels, times_in_bin
from immiscible_cli.analysis.posterior import batch_grams, batch_measures
from immiscible_cli.cli import app
from immiscible_cli.config import (DDPMObjective, FlowObjective, KNNAssigner, LinearAssigner, VanillaAssigner,
                                   load_config)
from immiscible_cli.data import ImageSet, load_images
from immiscible_cli.errors import UserError
from immiscible_cli.objectives import DDPM, Flow

runner = CliRunner()
# 8 px embedded images, 16 per batch: every data-mode measure in well under a second per batch
SMALL = ["data.max_images=256", "data.resolution=8", "data.fit=resize", "train.batch_size=16",
         "model.channel_mult=[1, 2]", "model.attn_resolutions=[4]"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small tensors; a busy 2-core machine runs them faster on one thread


def brute_force(x0, noise, point):
    """The posterior, accuracy and best-denoiser error from explicit x_t, distances and targets, in float64."""
    x, n = x0.flatten(1).double(), noise.flatten(1).double()
    x_t = point.signal * x + point.noise * n  # [B, D]
    logits = -torch.cdist(x_t, point.signal * x).square() / (2 * point.noise ** 2)  # [B, B]
    w = torch.softmax(logits, dim=1)
    target = point.target_data * x + point.target_noise * n  # [B, D]
    # each candidate image j implies the noise (x_t,i - a x0_j) / s, hence its own target
    implied = point.target_data * x[None] + point.target_noise * (x_t[:, None] - point.signal * x[None]) / point.noise
    prediction = (w[:, :, None] * implied).sum(dim=1)  # [B, D]
    rows = torch.arange(len(x))
    return w[rows, rows], (w.argmax(1) == rows).double(), (prediction - target).square().mean(dim=1)


@pytest.mark.parametrize("objective", [DDPM(DDPMObjective()), Flow(FlowObjective())])
def test_gram_shortcut_equals_brute_force(objective):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(12, 1, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(12, 1, 4, 4, generator=generator)
    points = [noise_level(objective, level) for level in (0.05, 0.3, 0.6, 0.9, 1.0)]
    fast = batch_measures(batch_grams(x0, noise), points, 16)
    for p, point in enumerate(points):
        posterior, correct, irreducible = brute_force(x0, noise, point)
        torch.testing.assert_close(fast["posterior"][p], posterior, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fast["correct"][p], correct)
        torch.testing.assert_close(fast["irreducible"][p], irreducible, rtol=1e-6, atol=1e-10)


def test_noise_levels_follow_each_objective():
    ddpm, flow = DDPM(DDPMObjective()), Flow(FlowObjective())
    assert [noise_level(ddpm, level).t for level in (0.5, 0.9, 1.0)] == [500, 900, 999]
    assert noise_level(ddpm, 0.5).signal == pytest.approx(math.sqrt(float(ddpm.alpha_bar[500])))
    point = noise_level(flow, 0.9)  # t = 0.1: x_t = 0.1 data + 0.9 noise, target data - noise
    assert (point.t, point.signal, point.noise, point.target_data, point.target_noise) == \
        pytest.approx((0.1, 0.1, 0.9, 1.0, -1.0))
    t = times_in_bin(ddpm, 0.2, 0.3, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 200 <= int(t.min()) and int(t.max()) < 300
    t = times_in_bin(flow, 0.2, 0.3, 1000, torch.Generator().manual_seed(0))
    assert 0.7 < float(t.min()) and float(t.max()) <= 0.8 + 1e-6
    assert parse_levels("0.9, 0.5,0.5") == (0.5, 0.9)
    for bad in ("0,0.5", "1.5", "x", ""):
        with pytest.raises(UserError, match="--levels"):
            parse_levels(bad)


@pytest.fixture(scope="module")
def batches():
    cfg = load_config("fmnist-vanilla", SMALL + ["data.source=embedded"])
    return cfg, load_images(cfg.data)


def measure(batches, rule, count=6, levels=(0.0001, 0.5, 0.9, 1.0)):
    cfg, images = batches
    return data_mode.measure(cfg, rule, images, data_mode.DataSettings(batches=count, levels=levels))


def test_knn_k1_measures_equal_vanilla(batches):
    vanilla, knn1 = measure(batches, VanillaAssigner()), measure(batches, KNNAssigner(k=1))
    assert json.dumps(vanilla, sort_keys=True) == json.dumps(knn1, sort_keys=True)
    assert vanilla["distance_reduction"] == 0.0


def test_posterior_from_one_hot_to_uniform_and_knn_keeps_images_apart(batches):
    vanilla = measure(batches, VanillaAssigner(), count=12)
    knn = measure(batches, KNNAssigner(k=32), count=12)
    near_clean, _, point9, noise_end = vanilla["levels"]
    assert near_clean["t"] == 0 and near_clean["accuracy"] == 1.0 and near_clean["posterior_mean"] > 0.999
    assert near_clean["irreducible_loss"] < 1e-8  # a one-hot posterior leaves nothing to learn
    assert noise_end["t"] == 999 and noise_end["posterior_mean"] < 2 / 16 and noise_end["accuracy"] < 3 / 16
    assert knn["levels"][2]["accuracy"] > point9["accuracy"]
    assert knn["levels"][2]["posterior_mean"] > point9["posterior_mean"]
    assert knn["distance_reduction"] > 0.01 and knn["noise_sqnorm"] < vanilla["noise_sqnorm"]


def test_linear_noise_is_a_permutation_and_less_miscible(batches):
    vanilla, linear = measure(batches, VanillaAssigner(), count=30), measure(batches, LinearAssigner(), count=30)
    # the batch's noises are vanilla's draw permuted: the same values, so the same Gaussianity numbers
    for key in ("max_abs_mean", "mean_variance", "ks_statistic"):
        assert linear["gaussianity"][key] == pytest.approx(vanilla["gaussianity"][key], rel=1e-9)
    assert linear["noise_sqnorm"] == pytest.approx(vanilla["noise_sqnorm"], rel=1e-6)
    assert linear["miscibility"] > vanilla["miscibility"] + 0.5
    assert vanilla["miscibility_raw"] == pytest.approx(math.sqrt(2 * 64 / 30), rel=0.25)  # the finite-draw floor


def test_knn_noise_fails_the_gaussianity_test(batches):
    vanilla = measure(batches, VanillaAssigner(), count=20, levels=(0.5,))["gaussianity"]
    knn = measure(batches, KNNAssigner(k=64), count=20, levels=(0.5,))["gaussianity"]
    assert vanilla["ks_pvalue"] > 1e-3 and abs(vanilla["mean_variance"] - 1) < 0.05
    assert knn["ks_pvalue"] < 1e-3 and knn["mean_variance"] < 0.95


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_data_mode_writes_json_table_and_plots(tmp_path):
    out = tmp_path / "analysis"
    result = invoke("analyze", "--preset", "fmnist-vanilla", "--preset", "fmnist-knn", "--set",
                    "data.source=embedded", *sum((["--set", s] for s in SMALL), []), "--batches", 3,
                    "--levels", "0.5,0.9", "--out", out)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "analysis.json").read_text())
    labels = [line["label"] for line in payload["lines"]]
    assert labels == ["fmnist-vanilla", "fmnist-knn"]  # the vanilla preset is the shared baseline: listed once
    assert payload["lines"][1]["baseline"] == "fmnist-vanilla"
    assert [row["t"] for row in payload["lines"][1]["levels"]] == [500, 900]
    for name in ("posterior_mean.png", "accuracy.png", "irreducible_loss.png", "noise.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fmnist-knn" in result.output and "knn k=8" in result.output and "KS p-value" in result.output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    args = ["train", "--preset", "fmnist-knn", "--out", str(root)]
    for override in TINY + ["data.source=embedded", "assigner.k=4", "sample.ddim_grid=linspace"]:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return next(root.iterdir())


def stub_extractor(mode="clean", device="cpu", weights=None, batch_size=64, **_):
    from immiscible_cli.metrics import FIDExtractor, WeightsInfo

    return FIDExtractor(mode, device, batch_size=batch_size, network=StubNetwork(),
                        info=WeightsInfo("stub", "", "0" * 64, "float32"))


def test_run_mode_measures_a_trained_run(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(run_mode, "FIDExtractor", stub_extractor)
    out = tmp_path / "run-analysis"
    result = invoke("analyze", trained_run, "--images", 16, "--bins", 4, "--samples", 8, "--out", out)
    assert result.exit_code == 0, result.output
    (run,) = json.loads((out / "analysis.json").read_text())["runs"]
    assert run["held_out"] == "the 9936 images after data.max_images"
    bins = run["loss_per_bin"]["bins"]
    assert len(bins) == 4 and all(b["own"] > 0 and b["vanilla"] > 0 for b in bins)
    rows = run["bijectivity"]["rows"]
    assert [row["W"] for row in rows] == [0.1, 0.2, 0.3]
    assert 0 < rows[0]["pixel_rms"] < rows[1]["pixel_rms"] < rows[2]["pixel_rms"]  # farther start, farther image
    assert rows[0]["relative"] < 1 and rows[0]["feature_l2"] > 0
    div = run["diversity"]
    assert div["sample_to_train_rms"] > 0 and div["sample_to_sample_rms"] > 0 and div["heldout_to_train_rms"] > 0
    for name in ("loss_per_bin.png", "bijectivity.png", "diversity.png", f"bijectivity-{trained_run.name}.png"):
        assert (out / name).is_file()
    # off a terminal each long phase says what it does before it starts (the test runner is not a terminal)
    lines = result.output.splitlines()
    phases = [next(i for i, line in enumerate(lines) if what in line)
              for what in ("loss in 4 noise-level bins on 16 images (the 9936 images after data.max_images)",
                           "bijectivity, 8 samples at W = 0, 0.1, 0.2, 0.3", "diversity, nearest neighbours")]
    assert phases == sorted(phases)


@pytest.mark.parametrize("noise", ["per-image", "counter"])
def test_unperturbed_samples_are_the_sample_commands(trained_run, noise):
    from immiscible_cli import generation, runs
    from immiscible_cli.data import to_uint8
    from immiscible_cli.networks import load_network

    net, cfg, _, _ = load_network(runs.open_run(trained_run))
    if not hasattr(cfg.sample, "noise"):
        pytest.skip("this config has no sample.noise")
    cfg.sample.noise = noise
    made = run_mode.perturbed_samples(net, cfg, [0, 1, 2], 0.0, sampler="ddim", steps=2, device=torch.device("cpu"))
    expected = generation.generate(net, cfg, [0, 1, 2], sampler="ddim", steps=2, guidance=cfg.sample.guidance)
    assert torch.equal(to_uint8(made), expected)
    moved = run_mode.perturbed_samples(net, cfg, [0, 1, 2], 0.2, sampler="ddim", steps=2, device=torch.device("cpu"))
    assert not torch.equal(moved, made)


def test_help_has_examples():
    result = invoke("analyze", "--help")
    assert result.exit_code == 0 and "Examples" in result.output and "immiscible analyze --preset" in result.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loss_per_bin_on_cuda_matches_the_cpu(trained_run):
    from immiscible_cli import runs
    from immiscible_cli.networks import load_network

    run = runs.open_run(trained_run)
    settings = run_mode.RunSettings(images=16, bins=3)
    held, _ = run_mode.held_out(run.config())
    cpu = run_mode.loss_per_bin(*load_network(run)[:2], held, settings, torch.device("cpu"))
    cuda = run_mode.loss_per_bin(*load_network(run, device=torch.device("cuda"))[:2], held, settings,
                                 torch.device("cuda"))
    for a, b in zip(cpu["bins"], cuda["bins"]):  # pairing and times on the CPU: only the network's arithmetic differs
        assert b["own"] == pytest.approx(a["own"], rel=1e-2) and b["vanilla"] == pytest.approx(a["vanilla"], rel=1e-2)


@pytest.mark.parametrize("args, needle", [
    (["{tmp}"], "not a run directory"),
    (["{run}", "--preset", "fmnist-knn"], "not both"),
    ([], "nothing to analyze"),
    (["--preset", "fmnist-knn", "--levels", "0.5,2"], "--levels"),
    (["{run}", "--set", "train.lr=1"], "--set"),
])
def test_bad_input_is_a_clean_error(trained_run, tmp_path, args, needle):
    result = invoke("analyze", *[a.format(tmp=tmp_path, run=trained_run) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "analysis").exists()


def test_the_data_directions_see_the_tilt_random_directions_miss(batches):
    def along(rule) -> dict[str, dict]:
        found = measure(batches, rule, count=20, levels=(0.5,))["gaussianity"]["data_directions"]
        return {row["direction"]: row for row in found}

    vanilla, l2 = along(VanillaAssigner()), along(KNNAssigner(k=8))
    centred = along(KNNAssigner(k=8, knn_score="centred"))
    assert list(vanilla) == ["data mean", "PC1", "PC2", "PC3"]
    assert abs(vanilla["data mean"]["mean"]) < 0.2 and vanilla["data mean"]["ks_pvalue"] > 1e-3
    assert l2["data mean"]["mean"] > 0.4 and l2["data mean"]["ks_pvalue"] < 1e-6  # KNN leans toward the data mean
    assert abs(centred["data mean"]["mean"]) < 0.2  # the centred score does not
    assert centred["PC1"]["variance"] > vanilla["PC1"]["variance"] + 0.1  # but spreads along the top component


def test_data_directions_are_unit_and_the_mean_first():
    images = ImageSet(torch.randint(0, 256, (40, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8), torch.zeros(40, dtype=torch.long), 0, "t")
    names, basis = data_mode.data_directions(images, hflip=True, components=2)
    assert names == ["data mean", "PC1", "PC2"] and basis.shape == (16, 3)
    assert torch.allclose(torch.linalg.vector_norm(basis, dim=0), torch.ones(3, dtype=torch.float64))
    mean = data_mode.mean_image(images, True).flatten().double()
    assert torch.allclose(basis[:, 0], mean / mean.norm())
    assert abs(float(basis[:, 1] @ basis[:, 2])) < 1e-9
