"""The fast FID path, checked on the CPU: counter-based noise (Philox known answers, batch invariance), bf16
sampling, the eigenvalue Frechet distance against scipy's sqrtm, Inception precision, and old fid.jsonl rows
staying comparable with the settings added since."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import StubNetwork

from immiscible_cli import generation, networks, sampling
from immiscible_cli.config import load_config
from immiscible_cli.counter_noise import CounterNoise, counter_normal, philox4x32
from immiscible_cli.metrics import FIDExtractor, ReferenceKey, WeightsInfo, frechet_distance, frechet_distance_eigh
from immiscible_cli.metrics.scorer import inception_precision, sampling_settings
from immiscible_cli.runs import fid_settings


def words(values: list[int]) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter, key, expected", [  # Random123's known-answer vectors for philox4x32-10
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_known_answers(counter, key, expected):
    assert [int(w) for w in philox4x32(words(counter), words(key))] == expected


def test_counter_noise_is_batch_invariant_and_gaussian():
    seeds = list(range(64))
    shape = (3, 5, 7)  # 105 values: not a multiple of the 4 values of one Philox block
    whole = counter_normal(seeds, 0, shape, "cpu")  # [64, 3, 5, 7]
    for size in (1, 7, 64):
        parts = torch.cat([counter_normal(seeds[i:i + size], 0, shape, "cpu") for i in range(0, 64, size)])
        assert torch.equal(parts, whole)
    values = counter_normal(list(range(2000)), 0, (32,), "cpu").flatten().double()  # 64k draws
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02
    assert abs((values ** 4).mean() - 3) < 0.1  # Gaussian kurtosis
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(counter_normal([0], 1, shape, "cpu"), whole[:1])  # the next draw is another draw
    big = counter_normal([2**64 - 1, 2**32], 0, shape, "cpu")  # seeds use both 32-bit key words
    assert not torch.equal(big[0], big[1]) and torch.isfinite(big).all()
    source = CounterNoise([5, 9], torch.device("cpu"))
    first, second = source.randn_like(torch.empty(2, *shape)), source.randn_like(torch.empty(2, *shape))
    assert torch.equal(first, whole[[5, 9]]) and torch.equal(second, counter_normal([5, 9], 1, shape, "cpu"))


def random_net(cfg) -> torch.nn.Module:
    net = networks.build_network(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return net


def test_generate_with_counter_noise_in_batches_of_1_7_and_64(tiny):
    cfg = load_config("quickstart", tiny + ["sample.noise=counter"])
    net = random_net(cfg)
    seeds = list(range(9))  # batches of 7 leave a batch of 2; batches of 64 hold them all
    images = {size: generation.generate(net, cfg, seeds, sampler="euler", steps=2, batch=size) for size in (1, 7, 64)}
    assert (images[1].int() - images[64].int()).abs().max() <= 1  # equal up to a rounding flip at .5
    assert (images[7].int() - images[64].int()).abs().max() <= 1
    assert (images[1] == images[64]).float().mean() > 0.999
    per_image = generation.generate(net, load_config("quickstart", tiny), seeds[:4], sampler="euler", steps=2)
    assert not torch.equal(per_image, images[64][:4])  # the default noise is untouched, and different


def test_bf16_sampling_stays_close_to_fp32(tiny):
    cfg = load_config("quickstart", tiny)
    net = random_net(cfg)
    fp32 = generation.generate(net, cfg, list(range(8)), sampler="euler", steps=2)
    bf16 = generation.generate(net, cfg, list(range(8)), sampler="euler", steps=2, precision="bf16")
    assert bf16.dtype == torch.uint8 and bf16.shape == fp32.shape
    assert (bf16.int() - fp32.int()).abs().float().mean() < 2.0  # uint8 levels; bf16 has 8 mantissa bits


def covariance_pair(n1: int, n2: int, dim: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = rng.normal(size=(n1, dim)) @ mixing + 0.3
    b = rng.normal(size=(n2, dim)) @ (mixing + 0.2 * rng.normal(size=(dim, dim)) / np.sqrt(dim))
    return a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)


@pytest.mark.parametrize("n1, n2, dim", [(12, 12, 8), (500, 800, 64), (20, 50, 64), (40, 40, 128)])
def test_eigenvalue_frechet_distance_equals_scipy_sqrtm(n1, n2, dim):
    """Full-rank statistics, and the rank-deficient ones of fewer images than dimensions (an FID of 200 images)."""
    stats = covariance_pair(n1, n2, dim, seed=dim + n1)
    reference = frechet_distance(*stats)
    assert frechet_distance_eigh(*stats) == pytest.approx(reference, abs=1e-3, rel=1e-6)
    mu, sigma = stats[:2]
    assert abs(frechet_distance_eigh(mu, sigma, mu, sigma)) < 1e-3  # a set against itself
    assert frechet_distance_eigh(*stats[2:], *stats[:2]) == pytest.approx(reference, abs=1e-3)  # symmetric


def test_inception_precision_is_applied_and_recorded():
    seen = []

    def network(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return StubNetwork()(x.float()).to(x.dtype)

    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    info = WeightsInfo("stub", "", "0" * 64, "float32")
    fp32 = FIDExtractor("clean", network=network, info=info).features([images])
    fp16 = FIDExtractor("clean", network=network, info=info, precision="fp16").features([images])
    assert seen == [torch.float32, torch.float16] and fp16.dtype == np.float64
    np.testing.assert_allclose(fp16, fp32, rtol=2e-3, atol=2e-3)
    assert inception_precision("fp16", torch.device("cpu")) == "fp32"  # the CPU always runs fp32
    assert inception_precision("fp16", torch.device("cuda")) == "fp16"
    key = ReferenceKey("fashion-mnist", "train", 32, "clean", 10, "ab" * 32, "float32")
    assert key.filename() == "fashion-mnist_train_32px_clean_n10_wabababababab-fp32.npz"  # earlier names hold
    assert replace(key, precision="fp16").filename().endswith("-fp32_fp16run.npz")


def test_rows_written_before_the_new_settings_stay_comparable(tiny):
    cfg = load_config("quickstart", tiny)
    old = {"kimg": 1.0, "fid": 50.0, "sampling": {"eta": None, "clip_x0": None, "ddim_grid": None,
                                                  "ode_atol": None, "ode_rtol": None},
           "weights": {"source": "x", "sha256": "y", "dtype": "float32"}}
    new = {**old, "sampling": {**sampling_settings(cfg, "euler"), "precision": "fp32"}, "inception_precision": "fp32"}
    assert fid_settings(old) == fid_settings(new)
    counter = load_config("quickstart", tiny + ["sample.noise=counter"])
    for changed in ({**new, "sampling": {**sampling_settings(counter, "euler"), "precision": "fp32"}},
                    {**new, "sampling": {**new["sampling"], "precision": "bf16"}},
                    {**new, "inception_precision": "fp16"}):
        assert fid_settings(changed) != fid_settings(old)


def test_start_std_scales_only_the_starting_noise_and_is_recorded(tiny, monkeypatch):
    base = load_config("quickstart", tiny)
    smaller = load_config("quickstart", tiny + ["sample.start_std=0.5"])
    starts = []
    real_build = generation.build_objective

    def capturing(cfg):
        objective = real_build(cfg)
        real_sample = objective.sample

        def sample(net, noise, **kwargs):
            starts.append(noise.clone())
            return real_sample(net, noise, **kwargs)
        objective.sample = sample
        return objective
    monkeypatch.setattr(generation, "build_objective", capturing)
    net = random_net(base)
    first = generation.generate(net, base, [3, 4], sampler="euler", steps=2)
    second = generation.generate(net, smaller, [3, 4], sampler="euler", steps=2)
    assert torch.equal(starts[1], starts[0] * 0.5)  # x_T ~ N(0, 0.25 I): the same draw, scaled
    assert not torch.equal(first, second)
    assert sampling_settings(smaller, "euler")["start_std"] == 0.5
    old_row = {"sampling": {"eta": None, "clip_x0": None, "ddim_grid": None, "ode_atol": None, "ode_rtol": None}}
    assert fid_settings(old_row)["sampling"]["start_std"] == 1.0  # rows before the field: the papers' N(0, I)
    assert fid_settings({"sampling": sampling_settings(smaller, "euler")}) != fid_settings(old_row)
