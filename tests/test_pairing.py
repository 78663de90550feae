"""The public pairing API (immiscible_cli.pairing, docs/API.md): a light import, any [B, ...] shape, half inputs, the
data mean and decode helpers, one-line errors, the trainer's noise for the same generator, and two processes equal
to one."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from immiscible_cli import pairing, run_create, train_state, trainer
from immiscible_cli.config import KNNAssigner, LinearAssigner, VanillaAssigner, load_config
from immiscible_cli.data import load_images, mean_image

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name -> (rule, params): every rule and KNN score
    "vanilla": ("vanilla", {}), "linear": ("linear", {}), "linear_fp16": ("linear", {"quantize": "fp16"}),
    "knn": ("knn", {"k": 4}), "knn_direction": ("knn", {"k": 4, "knn_score": "direction"}),
    "knn_centred": ("knn", {"k": 4, "knn_score": "centred"}),
}


def batch(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Structured data (a shared offset plus noise), so that pairing has something to find."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(shape, generator=g) + torch.linspace(-1, 1, shape[-1])
    return x.to(dtype)


def run_pair(x, name, seed=7, stats=None, **extra):
    rule, params = CASES[name]
    center = x.float().mean(0) if name == "knn_centred" else None
    return pairing.pair(x, rule, torch.Generator().manual_seed(seed), center=center, stats=stats, **params, **extra)


def test_importing_the_api_imports_torch_and_nothing_of_the_cli():
    code = ("import sys, immiscible_cli.pairing; "
            "print(' '.join(m for m in ('typer', 'rich', 'pydantic', 'scipy', 'matplotlib', 'yaml', 'immiscible_cli.cli', "
            "'immiscible_cli.config', 'immiscible_cli.assigners') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == ""


@pytest.mark.parametrize("name", CASES)
def test_any_batch_shape_is_paired_as_its_flat_samples(name):
    video = batch(6, 2, 3, 2, 2)  # [B, C, T, H, W]
    x, noise = run_pair(video, name, image_scale=2.0)
    assert noise.shape == video.shape and noise.dtype == video.dtype and x.shape == video.shape
    assert torch.equal(x, video * 2.0)
    as_image = video.reshape(6, 6, 2, 2)  # the same samples in memory order, as [B, C, H, W]: the same noise
    assert torch.equal(run_pair(as_image, name, image_scale=2.0)[1], noise.reshape(6, 6, 2, 2))
    vectors = batch(6, 5)  # [B, D], e.g. action trajectories
    x, noise = run_pair(vectors, name)
    assert x is vectors and noise.shape == (6, 5)
    assert torch.equal(run_pair(vectors.reshape(6, 5, 1, 1), name)[1].reshape(6, 5), noise)


@pytest.mark.parametrize("name", CASES)
def test_the_rules_keep_their_contracts_and_fill_the_stats(name):
    x = batch(8, 12)
    vanilla = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))  # the same seed's unpaired draw
    stats = {}
    _, noise = run_pair(x, name, stats=stats)
    assert set(stats) == set(pairing.STAT_KEYS) and all(v.dim() == 0 for v in stats.values())
    pair_dist, random_dist = float(stats["pair_dist"]), float(stats["random_dist"])
    assert float(stats["pair_dist_reduction"]) == pytest.approx((random_dist - pair_dist) / random_dist, abs=1e-6)
    rel = 1e-3 if name == "linear_fp16" else 1e-5  # the quantized rule measures the fp16-rounded noise
    assert float(stats["noise_sqnorm"]) == pytest.approx(noise.square().mean().item(), rel=rel)
    if name == "vanilla":
        assert torch.equal(noise, vanilla) and pair_dist == random_dist
    elif name.startswith("linear"):  # a permutation of the unpaired draw, no costlier in total than the identity
        order = torch.cdist(noise, vanilla).argmin(dim=1)
        assert torch.equal(noise, vanilla[order]) and sorted(order.tolist()) == list(range(8))
        assert (x - noise).norm(dim=1).sum() <= (x - vanilla).norm(dim=1).sum() + 1e-4
        assert pair_dist < random_dist
    else:  # knn: candidate 0 is the unpaired draw; l2 never keeps a farther candidate than it
        assert random_dist == pytest.approx((x - vanilla).norm(dim=1).mean().item(), rel=1e-5)
        if name == "knn":
            assert bool(((x - noise).norm(dim=1) <= (x - vanilla).norm(dim=1) + 1e-5).all())
        assert pair_dist < random_dist


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["linear", "knn", "knn_centred"])
def test_half_inputs_pair_in_their_dtype(name, dtype):
    x = batch(8, 16, dtype=dtype)
    stats = {}
    scaled, noise = run_pair(x, name, stats=stats)
    assert scaled is x and noise.dtype == dtype and bool(noise.isfinite().all())
    assert stats["pair_dist"].dtype == torch.float32 and float(stats["pair_dist_reduction"]) > 0


def test_make_rule_builds_the_trainers_config_sections():
    assert pairing.make_rule() == VanillaAssigner()
    assert pairing.make_rule("knn", k=16, knn_score="direction") == KNNAssigner(k=16, knn_score="direction")
    assert pairing.make_rule("linear", solver="scipy", scope="local") == LinearAssigner(scope="local")
    rule = pairing.make_rule("knn", k=4, image_scale=2.0)
    x = batch(4, 3)
    by_name = pairing.pair(x, "knn", torch.Generator().manual_seed(1), k=4, image_scale=2.0)
    by_rule = pairing.pair(x, rule, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_rule))
    assert pairing.needs_center(pairing.make_rule("knn", knn_score="centred"))
    assert not pairing.needs_center(pairing.make_rule("knn", k=1, knn_score="centred"))


@pytest.mark.parametrize("call, message", [
    (lambda x, g: pairing.pair(x, "nearest", g), "unknown pairing rule 'nearest'; choose one of vanilla, linear, knn"),
    (lambda x, g: pairing.pair(x, "linear", g, k=4), "rule 'linear' takes no k"),
    (lambda x, g: pairing.pair(x, "knn", g, k=0), "rule 'knn': k: Input should be greater than or equal to 1"),
    (lambda x, g: pairing.pair(x, pairing.make_rule("knn"), g, k=4), "pass the rule's parameters to make_rule"),
    (lambda x, g: pairing.pair(x[0, 0], "vanilla", g), "x0 must be a batch [B, ...]"),
    (lambda x, g: pairing.pair(x.long(), "vanilla", g), "x0 must be a float tensor"),
    (lambda x, g: pairing.pair(x, "knn", g, knn_score="centred"), "knn_score='centred' needs center="),
    (lambda x, g: pairing.pair(x, "knn", g, knn_score="centred", center=torch.zeros(5)), "center has 5 values"),
    (lambda x, g: pairing.pair(x, "vanilla", g, distributed=True), "distributed=True needs an initialised"),
])
def test_bad_input_is_one_value_error(call, message):
    with pytest.raises(ValueError) as raised:
        call(batch(4, 3, 4), torch.Generator())
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_data_mean_reads_tensors_loaders_and_dicts():
    data = batch(10, 3, 2)
    expected = data.double().mean(0).float()
    assert torch.equal(pairing.data_mean(data), expected)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.arange(10)), batch_size=4)
    assert torch.allclose(pairing.data_mean(loader), expected, atol=1e-7)  # (images, labels) batches
    assert torch.allclose(pairing.data_mean([{"pixel_values": data[:3]}, {"pixel_values": data[3:]}],
                                            key="pixel_values"), expected, atol=1e-7)
    assert torch.allclose(pairing.data_mean(iter([data[:4], data[4:]]), max_samples=6), data[:6].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="no samples"):
        pairing.data_mean([])


def test_decode_divides_by_the_image_scale_and_clips():
    samples = torch.tensor([-4.0, -1.0, 0.5, 3.0])
    assert torch.equal(pairing.decode(samples, pairing.make_rule("knn", image_scale=2.0)),
                       torch.tensor([-1.0, -0.5, 0.25, 1.0]))
    assert torch.equal(pairing.decode(samples, 2.0, clip=None), torch.tensor([-2.0, -0.5, 0.25, 1.5]))
    assert torch.equal(pairing.decode(samples, 1.0), samples.clamp(-1, 1))


@pytest.mark.parametrize("assigner", [["assigner.name=knn", "assigner.k=4", "assigner.knn_score=centred",
                                       "assigner.image_scale=2.0"], ["assigner.name=linear"]])
def test_the_api_gives_the_trainers_noise_for_the_same_generator(tmp_path, tiny, assigner):
    cfg = load_config("quickstart", tiny + assigner)
    data = load_images(cfg.data)
    loop = trainer.TrainingLoop(cfg, run_create.create_run(tmp_path, cfg), data, torch.device("cpu"))
    generator = torch.Generator().manual_seed(train_state.stream_seed(cfg.seed, "noise"))
    center = mean_image(data, cfg.data.hflip)  # in data space: the API scales it, as the trainer does
    scale = cfg.assigner.image_scale
    for _ in range(2):  # linear pairs the next batch on a worker thread meanwhile: the same numbers
        x0_scaled, _, noise = loop.batches.next()
        x0, mine = pairing.pair(x0_scaled / scale, cfg.assigner, generator, center=center)
        assert torch.equal(x0, x0_scaled) and torch.equal(mine, noise)
    assert loop.meter.pair_fn.func is pairing.pair_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_ROOT = Path(__file__).resolve().parents[1]
DIST_CASES = {"linear": {"scope": "global"}, "knn": {"k": 5}, "vanilla": {}}


def _two_ranks(rank: int, world: int, port: int, root: str) -> None:
    """A plain torch.distributed program (no immiscible session): each rank pairs its half of the batch."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    rows = slice(rank * 4, rank * 4 + 4)
    found = {name: pairing.pair(batch(8, 3, 4)[rows], name, torch.Generator().manual_seed(7), **params)[1]
             for name, params in DIST_CASES.items()}
    found["alone"] = pairing.pair(batch(8, 3, 4)[rows], "linear", torch.Generator().manual_seed(7),
                                  distributed=False)[1]
    torch.distributed.destroy_process_group()
    torch.save(found, Path(root) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_pair_their_rows_of_the_one_process_result(tmp_path):
    torch.multiprocessing.spawn(_two_ranks, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    x = batch(8, 3, 4)
    for name, params in DIST_CASES.items():
        alone = pairing.pair(x, name, torch.Generator().manual_seed(7), **params)[1]
        assert torch.equal(torch.cat([r0[name], r1[name]]), alone), name  # global assignment: bit for bit
    assert torch.equal(r0["alone"], pairing.pair(x[:4], "linear", torch.Generator().manual_seed(7))[1])


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_api_docs_examples_run(capsys):
    blocks = python_blocks(ROOT / "docs" / "API.md")
    assert len(blocks) == 4  # vanilla, linear, knn, image scaling
    for block in blocks:
        exec(compile(block, "docs/API.md", "exec"), {})
    assert "distance reduction 0." in capsys.readouterr().out


def test_the_readme_shows_the_api_in_about_ten_lines():
    (block,) = [b for b in python_blocks(ROOT / "README.md") if "immiscible_cli import pairing" in b]
    compile(block, "README.md", "exec")
    assert len(block.splitlines()) <= 12 and "pairing.pair(" in block and "pairing.decode(" in block
