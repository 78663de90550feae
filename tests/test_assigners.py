"""Tests of the noise assigners: the shared contract, linear assignment against brute force, KNN against a naive
implementation of its documented random stream, the papers' diagnostics, goldens, and the PairingMeter."""

from __future__ import annotations

import itertools
import typing
from contextlib import nullcontext

import pytest
import torch

from immiscible_cli import config
from immiscible_cli.assigners import ASSIGNERS, decode, knn, linear, pair, vanilla
from immiscible_cli.assigners.meter import PairingMeter
from immiscible_cli.config import KNNAssigner, LinearAssigner, VanillaAssigner

RULES = [VanillaAssigner(), LinearAssigner(), LinearAssigner(cost="sqeuclidean"), LinearAssigner(quantize="fp16"),
         KNNAssigner(k=4), KNNAssigner(k=3, memory_budget_mib=1e-3)]
IDS = ["vanilla", "linear-l2", "linear-sq", "linear-fp16", "knn4", "knn3-chunked"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, shape: tuple[int, ...] = (3, 8, 8), seed: int = 1, std: float = 0.5) -> torch.Tensor:
    """Image-like data in [-1, 1]: smooth (upsampled coarse noise), per-pixel std ~`std`."""
    coarse = torch.randn(batch, shape[0], max(1, shape[1] // 4), max(1, shape[2] // 4), generator=gen(seed))
    smooth = torch.nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    return (smooth * (std / smooth.std())).clamp(-1, 1)


def test_registry_matches_config_choices():
    members = typing.get_args(typing.get_args(config.Assigner)[0])  # Annotated[Union[...], Field] -> the models
    choices = tuple(typing.get_args(m.model_fields["name"].annotation)[0] for m in members)
    assert tuple(ASSIGNERS) == config.ASSIGNER_NAMES == choices


@pytest.mark.parametrize("cfg", RULES, ids=IDS)
@pytest.mark.parametrize("dtype,batch", [(torch.float32, 6), (torch.float64, 6), (torch.bfloat16, 6),
                                         (torch.float32, 1)])
def test_contract_shapes_dtypes_and_stats(cfg, dtype, batch):
    x0 = images(batch).to(dtype)
    stats: dict = {}
    with pytest.warns(UserWarning) if cfg.name == "knn" and cfg.memory_budget_mib < 1 else nullcontext():
        x0_paired, noise = pair(x0, cfg, gen(), stats)
    assert x0_paired is x0  # image_scale 1: the batch itself, not a copy
    assert noise.shape == x0.shape and noise.dtype == dtype and noise.device == x0.device
    assert set(stats) == {"pair_dist", "random_dist", "noise_sqnorm"}
    for value in stats.values():
        assert value.shape == () and value.dtype == torch.float32 and value.device == x0.device
    assert stats["pair_dist"] <= stats["random_dist"] * (1 + 1e-6)


# ---- linear assignment ------------------------------------------------------------------------------------------

def _total(x0: torch.Tensor, noise: torch.Tensor, cost: str) -> float:
    dist = torch.linalg.vector_norm((x0 - noise).flatten(1).double(), dim=1)
    return float((dist if cost == "l2" else dist.square()).sum())


@pytest.mark.parametrize("cost", ["l2", "sqeuclidean"])
@pytest.mark.parametrize("batch", [2, 3, 4, 5, 6])
def test_linear_total_cost_is_the_brute_force_minimum(batch, cost):
    x0 = torch.rand(batch, 1, 2, 3, generator=gen(batch + 100)) * 2 - 1  # D = 6: many close calls
    _, drawn = vanilla.pair(x0, VanillaAssigner(), gen(batch))
    _, paired = linear.pair(x0, LinearAssigner(cost=cost), gen(batch))
    best = min(_total(x0, drawn[list(p)], cost) for p in itertools.permutations(range(batch)))
    assert _total(x0, paired, cost) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("cfg", RULES[1:4], ids=IDS[1:4])
def test_linear_gives_image_i_the_noise_in_column_i(cfg):
    # Images built as the drawn noises in a 6-cycle order: the zero-cost assignment gives image i noise sigma(i);
    # reading scipy's answer the wrong way round would give noise sigma^-1(i), a different and far costlier one.
    _, drawn = vanilla.pair(images(6), VanillaAssigner(), gen(7))
    sigma = [1, 2, 3, 4, 5, 0]
    x0 = drawn[sigma].clone()
    _, paired = linear.pair(x0, cfg, gen(7))
    assert torch.equal(paired, x0)
    inverse = [sigma.index(i) for i in range(6)]
    assert _total(x0, drawn[inverse], "l2") > 1.0


def test_linear_solve_reads_rows_and_columns_the_right_way():
    cost = torch.ones(3, 3)
    cost[0, 2] = cost[1, 0] = cost[2, 1] = 0.0  # image 0 -> noise 2, image 1 -> noise 0, image 2 -> noise 1
    assert linear.solve(cost).tolist() == [2, 0, 1]


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_linear_noise_is_a_permutation_of_the_vanilla_draw(batch):
    x0 = images(batch)
    _, drawn = vanilla.pair(x0, VanillaAssigner(), gen(3))
    _, paired = linear.pair(x0, LinearAssigner(), gen(3))
    match = (paired.flatten(1)[:, None, :] == drawn.flatten(1)[None, :, :]).all(dim=2)  # [B, B] exact row equality
    assert match.sum(dim=1).eq(1).all() and match.sum(dim=0).eq(1).all()


def test_linear_fp16_cost_is_finite_and_accurate_at_latent_size():
    # SD-like latents 4x64x64: std ~1 with 5% of the values around +-8, so |x - n|^2 ~ 4.4 D = 72k > 65504, the
    # fp16 maximum: an unscaled fp16 cost would overflow. The 1/sqrt(D) pre-scale keeps it ~4.4.
    g = gen(5)
    x = torch.randn(8, 4 * 64 * 64, generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.05, 8 * torch.sign(x), x)
    n = torch.randn(8, 4 * 64 * 64, generator=g)
    assert torch.cdist(x, n).square().max() > torch.finfo(torch.float16).max
    for cost in ("l2", "sqeuclidean"):
        quantized, sq_dist, _ = linear.cost_matrix(x, n, cost, "fp16")
        exact, _, _ = linear.cost_matrix(x, n, cost, "none")
        assert quantized.dtype == torch.float16 and torch.isfinite(quantized).all()
        scale = 4 * 64 * 64 if cost == "sqeuclidean" else (4 * 64 * 64) ** 0.5
        torch.testing.assert_close(quantized.float() * scale, exact, rtol=2e-3, atol=0)
        torch.testing.assert_close(sq_dist, torch.cdist(x, n).square(), rtol=2e-3, atol=0)


# ---- KNN --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_knn_with_k1_is_vanilla_bit_for_bit(dtype, scale):
    x0 = images(5).to(dtype)
    _, expected = vanilla.pair(x0, VanillaAssigner(image_scale=scale), gen(11))
    _, got = knn.pair(x0, KNNAssigner(k=1, image_scale=scale), gen(11))
    assert torch.equal(got, expected)


def naive_knn(x0: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Reference: draw the documented stream (candidate 0 as the vanilla draw, then `draw_groups` calls), keep
    every candidate, float64 distances, argmin."""
    batch, dim = x0.shape[0], x0[0].numel()
    first = torch.randn(x0.shape, generator=generator, device=x0.device)  # candidate 0: the vanilla draw
    rest = [torch.randn((g, *x0.shape), generator=generator, device=x0.device)
            for g in knn.draw_groups(batch, dim, k)[1:]]
    candidates = torch.cat([first[None]] + rest)  # [k, B, C, H, W]
    dist = torch.linalg.vector_norm((candidates - x0).flatten(2).double(), dim=2)  # [k, B]
    return candidates[dist.argmin(dim=0), torch.arange(batch, device=x0.device)]


@pytest.mark.parametrize("group_candidates", [None, 1, 3])
def test_knn_keeps_the_nearest_candidate_of_its_stream(monkeypatch, group_candidates):
    x0 = images(16)
    if group_candidates:
        monkeypatch.setattr(knn, "DRAW_GROUP_ELEMENTS", group_candidates * x0.numel())
    _, got = knn.pair(x0, KNNAssigner(k=10), gen(2))
    assert torch.equal(got, naive_knn(x0, 10, gen(2)))
    # candidate 0 is the vanilla draw: with k = 2, about half of the images get exactly vanilla's noise
    x0 = images(64)
    _, drawn = vanilla.pair(x0, VanillaAssigner(), gen(2))
    _, got = knn.pair(x0, KNNAssigner(k=2), gen(2))
    assert 10 < (got == drawn).flatten(1).all(dim=1).sum() < 54


def test_knn_chunking_respects_the_budget_and_never_changes_the_result(monkeypatch):
    x0 = images(16)  # B = 16, D = 192
    batch, dim = 16, x0[0].numel()
    monkeypatch.setattr(knn, "DRAW_GROUP_ELEMENTS", 2 * batch * dim)  # draw groups of 2 candidates
    groups = knn.draw_groups(batch, dim, 13)
    assert groups == [1, 2, 2, 2, 2, 2, 2]
    results, plans = [], []
    for budget_bytes in (1, 6 * batch * dim * 4, 9 * batch * dim * 4, 2**30):
        plan = knn.plan_chunks(batch, dim, 13, 4, budget_bytes)
        plans.append(plan)
        assert [g for chunk in plan for g in chunk] == groups  # whole groups, in stream order
        if budget_bytes > 1:
            assert max(knn.chunk_bytes(chunk, batch, dim, 4) for chunk in plan) <= budget_bytes
        with pytest.warns(UserWarning) if budget_bytes == 1 else nullcontext():
            results.append(knn.pair(x0, KNNAssigner(k=13, memory_budget_mib=budget_bytes / 2**20), gen(4))[1])
    assert [len(plan) for plan in plans] == [7, 6, 3, 1]
    assert all(torch.equal(result, results[0]) for result in results[1:])


@pytest.mark.parametrize("batch,dim,k,chunks", [(2048, 4 * 64 * 64, 64, 13), (128, 3 * 32 * 32, 64, 1),
                                                (4096, 3 * 32 * 32, 8, 1)])
def test_knn_default_budget_holds_at_training_sizes(batch, dim, k, chunks):
    # The published code would hold B k D (4 + 2 + 2) bytes: 16 GiB for the first case.
    budget = KNNAssigner().memory_budget_mib * 2**20
    plan = knn.plan_chunks(batch, dim, k, 4, budget)
    assert max(knn.chunk_bytes(chunk, batch, dim, 4) for chunk in plan) <= budget
    assert len(plan) == chunks


def test_knn_noise_sqnorm_shrinks_with_k_as_in_the_paper():
    # Improved paper: E|n|^2 / D ~ 0.98 (k=4), 0.97 (k=8), 0.95 (k=64) at D = 3072 for images (std ~0.5).
    # Sampling error of the mean over 512 images is ~0.001; tolerance 0.006.
    x0 = images(512, (3, 32, 32), std=0.5)
    values = {}
    for k in (1, 4, 8, 64):
        stats: dict = {}
        knn.pair(x0, KNNAssigner(k=k), gen(k), stats)
        values[k] = float(stats["noise_sqnorm"])
    assert values[1] > values[4] > values[8] > values[64]
    assert values[4] == pytest.approx(0.98, abs=0.006)
    assert values[8] == pytest.approx(0.97, abs=0.006)
    assert values[64] == pytest.approx(0.95, abs=0.006)


# ---- shared properties ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [LinearAssigner(), KNNAssigner(k=8)], ids=["linear", "knn8"])
def test_pairing_brings_noise_closer_than_vanilla(cfg):
    x0 = images(64)
    vanilla_stats: dict = {}
    stats: dict = {}
    vanilla.pair(x0, VanillaAssigner(), gen(9), vanilla_stats)
    pair(x0, cfg, gen(9), stats)
    # the rule's random pairing is vanilla's draw (linear: identity pairing; knn: candidate 0)
    torch.testing.assert_close(stats["random_dist"], vanilla_stats["pair_dist"], rtol=1e-5, atol=0)
    assert stats["pair_dist"] < 0.99 * vanilla_stats["pair_dist"]


@pytest.mark.parametrize("cfg", RULES[:4] + [KNNAssigner(k=5)], ids=IDS[:4] + ["knn5"])
def test_image_scale_is_applied_before_pairing(cfg):
    x0 = images(8)
    scaled_cfg = cfg.model_copy(update={"image_scale": 2.0})
    x0_paired, noise = pair(x0, scaled_cfg, gen(6))
    expected_x0, expected_noise = pair(x0 * 2.0, cfg, gen(6))
    assert torch.equal(x0_paired, x0 * 2.0) and torch.equal(x0_paired, expected_x0)
    assert torch.equal(noise, expected_noise)


def test_decode_inverts_image_scale_and_clamps():
    cfg = KNNAssigner(image_scale=4.0)
    x0 = images(4)
    torch.testing.assert_close(decode(pair(x0, cfg, gen())[0], cfg), x0, rtol=0, atol=1e-7)
    assert decode(torch.tensor([-8.0, -2.0, 2.0, 8.0]), cfg).tolist() == [-1.0, -0.5, 0.5, 1.0]


# ---- several processes: each rule's sharded form ----------------------------------------------------------------

class SimulatedRanks:
    """`distributed`'s collectives for ranks run one after the other in this process. Every rank runs twice: the
    first round records what each rank gathers, the second sees every rank's tensor; `broadcast` hands rank 0's."""

    def __init__(self, world: int):
        self.world, self.rank = world, 0
        self.gathered: dict[int, torch.Tensor] = {}
        self.sent: torch.Tensor | None = None

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.gathered[self.rank] = x.clone()
        return [self.gathered.get(r, torch.zeros_like(x)) for r in range(self.world)]

    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            self.sent = tensor.clone()
        return self.sent.clone()


def rule_configs() -> list[tuple[str, typing.Any]]:
    """Every registered rule at its defaults, plus the settings with a sharded path of their own."""
    found = [(name, config.ASSIGNER_SECTIONS[name]()) for name in ASSIGNERS]
    return found + [("knn-centred", KNNAssigner(k=5, knn_score="centred")), ("knn-direction-scaled",
                    KNNAssigner(k=3, knn_score="direction", image_scale=2.0)),
                    ("knn-chunked", KNNAssigner(k=5, memory_budget_mib=1e-3)),
                    ("linear-fp16-scaled", LinearAssigner(quantize="fp16", image_scale=2.0))]


@pytest.mark.filterwarnings("ignore:knn. memory_budget_mib")
@pytest.mark.parametrize("name,cfg", rule_configs(), ids=[name for name, _ in rule_configs()])
def test_every_rule_on_two_simulated_ranks_is_the_one_process_rule(monkeypatch, name, cfg):
    from immiscible_cli import distributed
    from immiscible_cli.assigners import needs_center
    from immiscible_cli.assigners.shard import Shard

    world, x0 = 2, images(8)
    center = x0.mean(dim=0) * cfg.image_scale if needs_center(cfg) else None  # [C, H, W]
    ranks = SimulatedRanks(world)
    for attribute in ("all_gather", "is_main", "broadcast"):
        monkeypatch.setattr(distributed, attribute, getattr(ranks, attribute))
    for _ in range(2):  # round 1 fills the gathers, round 2 is compared
        shares = []
        for ranks.rank in range(world):
            part, stats = Shard(ranks.rank, world, 8), {}
            shares.append(pair(x0[part.rows], cfg, gen(7), stats, center, shard=part))
            assert set(stats) == {"pair_dist", "random_dist", "noise_sqnorm"}
    x_alone, noise_alone = pair(x0, cfg, gen(7), center=center)
    assert torch.equal(torch.cat([x for x, _ in shares]), x_alone)
    assert torch.equal(torch.cat([noise for _, noise in shares]), noise_alone), name
    assert not torch.equal(noise_alone, pair(x0, cfg, gen(8), center=center)[1])  # the seed matters: not vacuous


def test_rule_properties_come_from_the_rule():
    from immiscible_cli.assigners import needs_center, waits_for_host

    assert [name for name in ASSIGNERS if waits_for_host(config.ASSIGNER_SECTIONS[name]())] == ["linear"]
    assert needs_center(KNNAssigner(k=2, knn_score="centred"))
    assert not needs_center(KNNAssigner(k=1, knn_score="centred")) and not needs_center(LinearAssigner())


# ---- goldens ----------------------------------------------------------------------------------------------------
# Tiny seeded input per rule: every 9th noise value and the stats. Tolerance 1e-5 (absolute). They pin the random
# stream and the pairing; change them only on purpose: `python tests/test_assigners.py` prints fresh values.

GOLDEN = {  # name: (config, every 9th noise value, (pair_dist, random_dist, noise_sqnorm))
    "vanilla": (VanillaAssigner(), [-1.12584, -1.263335, 0.566651, 0.259627], (3.043536, 3.043536, 0.944038)),
    "linear-l2": (LinearAssigner(), [-1.12584, -1.263335, 0.259627, 0.566651], (3.03802, 3.043536, 0.944038)),
    "linear-sq-fp16": (LinearAssigner(cost="sqeuclidean", quantize="fp16"),
                       [-1.12584, -1.263335, 0.259627, 0.566651], (3.038078, 3.04359, 0.944205)),
    "knn4": (KNNAssigner(k=4), [-0.230335, -1.263335, 0.566651, 0.805754], (2.578584, 3.043536, 0.608468)),
    "knn4-scale2": (KNNAssigner(k=4, image_scale=2.0), [-0.230335, -1.263335, 0.566651, 0.805754],
                    (3.723036, 4.02932, 0.608468)),
}


def golden_values(name: str) -> tuple[list[float], tuple[float, ...]]:
    x0 = torch.linspace(-1, 1, 4 * 1 * 3 * 3).view(4, 1, 3, 3)
    stats: dict = {}
    _, noise = pair(x0, GOLDEN[name][0], gen(0), stats)
    return ([round(v, 6) for v in noise.flatten()[::9].tolist()],
            tuple(round(float(stats[key]), 6) for key in ("pair_dist", "random_dist", "noise_sqnorm")))


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_values(name):
    noise, stats = golden_values(name)
    assert noise == pytest.approx(GOLDEN[name][1], abs=1e-5)
    assert stats == pytest.approx(GOLDEN[name][2], abs=1e-5)


# ---- meter ------------------------------------------------------------------------------------------------------

def test_pairing_meter_summaries():
    meter = PairingMeter("cpu")
    assert meter.summary() == {}
    for step in range(3):
        meter.pair(images(32), VanillaAssigner(), gen(step))
    plain = meter.summary()
    assert set(plain) == {"assign_ms", "pair_dist", "pair_dist_reduction", "noise_sqnorm"}
    assert plain["pair_dist_reduction"] == 0.0 and plain["assign_ms"] > 0
    assert plain["noise_sqnorm"] == pytest.approx(1.0, abs=0.05)
    assert meter.summary() == {}  # reset by the summary
    for step in range(3):
        meter.pair(images(32), KNNAssigner(k=8), gen(step))
    chosen = meter.summary()
    assert chosen["pair_dist_reduction"] > 0.005 and chosen["pair_dist"] < plain["pair_dist"]
    assert chosen["noise_sqnorm"] < plain["noise_sqnorm"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rules_never_sync_the_host():
    x0 = images(64).cuda()
    meter = PairingMeter("cuda")
    for cfg in (VanillaAssigner(), KNNAssigner(k=8), KNNAssigner(k=8, memory_budget_mib=0.1)):
        generator = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with nullcontext() if cfg.memory_budget_mib > 1 else pytest.warns(UserWarning):
                meter.pair(x0, cfg, generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert meter.summary()["pair_dist_reduction"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:knn")
@pytest.mark.parametrize("group_candidates", [None, 1, 3])  # 1: one candidate per call, scored by cdist
@pytest.mark.parametrize("budget_mib", [1024.0, 0.2])
def test_cuda_knn_matches_its_stream_and_vanilla(monkeypatch, group_candidates, budget_mib):
    x0 = images(64).cuda()
    if group_candidates:
        monkeypatch.setattr(knn, "DRAW_GROUP_ELEMENTS", group_candidates * x0.numel())
    cuda_gen = lambda seed: torch.Generator(device="cuda").manual_seed(seed)  # noqa: E731
    _, got = knn.pair(x0, KNNAssigner(k=10, memory_budget_mib=budget_mib), cuda_gen(2))
    assert torch.equal(got, naive_knn(x0, 10, cuda_gen(2)))
    _, expected = vanilla.pair(x0, VanillaAssigner(), cuda_gen(3))
    assert torch.equal(knn.pair(x0, KNNAssigner(k=1), cuda_gen(3))[1], expected)


if __name__ == "__main__":  # print fresh goldens (to update GOLDEN on purpose)
    for golden_name in GOLDEN:
        print(golden_name, *golden_values(golden_name))


@pytest.mark.parametrize("quantize", ["none", "fp16"])
def test_lapjv_finds_an_assignment_as_cheap_as_scipys(quantize):
    pytest.importorskip("lap")
    x = torch.randn(96, 48, generator=gen(5))
    n = torch.randn(96, 48, generator=gen(6))
    cost, _, _ = linear.cost_matrix(x, n, "l2", quantize)  # fp16 costs have ties: the optimum need not be unique
    c = cost.double()
    rows = torch.arange(96)
    by_scipy, by_lapjv = linear.solve(cost, "scipy"), linear.solve(cost, "lapjv")
    assert sorted(by_lapjv.tolist()) == list(range(96))  # a permutation
    assert c[rows, torch.from_numpy(by_lapjv)].sum().item() == pytest.approx(
        c[rows, torch.from_numpy(by_scipy)].sum().item(), rel=1e-12)
    assert linear.solve(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), "lapjv").tolist() == [2, 0, 1]


def test_lapjv_without_the_package_is_one_line_exit_2(tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from immiscible_cli.cli import app

    monkeypatch.setitem(sys.modules, "lap", None)  # import lap -> ImportError
    result = CliRunner().invoke(app, ["train", "--preset", "quickstart", "--out", str(tmp_path / "runs"),
                                      "--set", "assigner.name=linear", "--set", "assigner.solver=lapjv"])
    assert result.exit_code == 2, result.output
    assert "assigner.solver: lapjv needs the `lap` package" in result.output
    assert not (tmp_path / "runs").exists()  # failed before anything was written
