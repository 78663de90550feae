"""KNN's `direction` and `centred` scores: the contract of each (kept norms exactly chi^2_D, the centred mean near 0
along the data mean, k = 1 vanilla, the candidate a naive search keeps, chunk-invariant, sharded equal to one
process), with the paper's `l2` rule as the control that fails the same checks."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from immiscible_cli.assigners import center_for, knn, needs_center, pair, shard, vanilla
from immiscible_cli.config import KNNAssigner, VanillaAssigner
from immiscible_cli.data import ImageSet, mean_image, tensor_digest

SCORES = ("direction", "centred")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dark_background(batch: int, side: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 1, side, side] with a strong mean image (a dark background, -0.8, as Fashion-MNIST's) plus
    per-image structure, and that mean."""
    mean = torch.full((1, side, side), -0.8)
    mean[:, side // 4:3 * side // 4, side // 4:3 * side // 4] = 0.3
    x = mean + 0.5 * torch.randn((batch, 1, side, side), generator=gen(seed))
    return x, mean


def kept(score: str, x: torch.Tensor, center: torch.Tensor, k: int = 8, seed: int = 3, **cfg) -> torch.Tensor:
    return knn.pair(x, KNNAssigner(k=k, knn_score=score, **cfg), gen(seed), center=center)[1]


def naive(score: str, x0: torch.Tensor, k: int, generator: torch.Generator, center: torch.Tensor) -> torch.Tensor:
    """Reference: the documented stream, every candidate kept, float64 cosines, argmax."""
    batch, dim = x0.shape[0], x0[0].numel()
    first = torch.randn(x0.shape, generator=generator)
    rest = [torch.randn((g, *x0.shape), generator=generator) for g in knn.draw_groups(batch, dim, k)[1:]]
    candidates = torch.cat([first[None]] + rest).flatten(2).double()  # [k, B, D]
    target = (x0 - center if score == "centred" else x0).flatten(1).double()  # [B, D]
    cosine = (candidates * target).sum(-1) / torch.linalg.vector_norm(candidates, dim=-1)  # [k, B]
    return candidates[cosine.argmax(dim=0), torch.arange(batch)].view(x0.shape).float()


@pytest.mark.parametrize("score", SCORES)
def test_kept_norms_are_chi_square_d_where_l2_fails(score):
    x, mean = dark_background(3000)
    dim = x[0].numel()
    p_value = stats.kstest(kept(score, x, mean).flatten(1).square().sum(1).numpy(), stats.chi2(dim).cdf).pvalue
    assert p_value > 0.01
    l2 = kept("l2", x, mean).flatten(1).square().sum(1).numpy()
    assert stats.kstest(l2, stats.chi2(dim).cdf).pvalue < 1e-6  # the paper's rule: shorter than chi_D


def test_centred_keeps_the_mean_near_zero_along_the_data_mean_where_the_others_lean():
    x, mean = dark_background(3000)
    direction = (mean / torch.linalg.vector_norm(mean)).flatten()

    def lean(score: str) -> float:  # mean projection of the kept noise on the data mean's direction, in sd units
        return float((kept(score, x, mean).flatten(1) @ direction).mean())

    assert abs(lean("centred")) < 0.1  # 3000 draws: the standard error of a Gaussian projection's mean is 0.018
    assert lean("l2") > 0.5 and lean("direction") > 0.5  # both pulled toward the data mean
    assert lean("direction") > lean("l2")  # and the direction rule more so, as measured on Fashion-MNIST


@pytest.mark.parametrize("score", SCORES)
def test_each_image_keeps_the_best_cosine_of_its_stream(score):
    x, mean = dark_background(16)
    assert torch.allclose(kept(score, x, mean, k=10, seed=5), naive(score, x, 10, gen(5), mean))


@pytest.mark.parametrize("score", SCORES)
def test_k1_is_vanilla_bit_for_bit(score):
    x, mean = dark_background(6)
    _, expected = vanilla.pair(x, VanillaAssigner(), gen(7))
    assert torch.equal(kept(score, x, mean, k=1, seed=7), expected)


@pytest.mark.parametrize("score", SCORES)
def test_the_memory_budget_never_changes_the_choice(score, monkeypatch):
    x, mean = dark_background(16)
    monkeypatch.setattr(knn, "DRAW_GROUP_ELEMENTS", 2 * x.numel())  # draw groups of 2 candidates: several chunks
    results = []
    for budget_mib in (6 * x.numel() * 4 / 2**20, 2.0**10):
        results.append(kept(score, x, mean, k=13, memory_budget_mib=budget_mib))
    assert len(knn.plan_chunks(16, x[0].numel(), 13, 4, 6 * x.numel() * 4)) > 1
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("score", SCORES)
def test_two_ranks_pair_as_one_process(score):
    x, mean = dark_background(8)
    cfg = KNNAssigner(k=6, knn_score=score, image_scale=2.0)
    one_x, one = pair(x, cfg, gen(9), center=mean * 2.0)
    parts = [pair(x[r * 4:(r + 1) * 4], cfg, gen(9), None, mean * 2.0, shard=shard.Shard(r, 2, 8))
             for r in range(2)]
    assert torch.equal(torch.cat([p[1] for p in parts]), one)
    assert torch.equal(torch.cat([p[0] for p in parts]), one_x)


def test_stats_report_l2_distances_for_every_score():
    x, mean = dark_background(64)
    for score in ("l2", *SCORES):
        stats_: dict = {}
        _, noise = knn.pair(x, KNNAssigner(k=8, knn_score=score), gen(2), stats_, center=mean)
        chosen = torch.linalg.vector_norm((x - noise).flatten(1), dim=1).mean()
        assert torch.allclose(stats_["pair_dist"], chosen, rtol=1e-4)
        random = torch.linalg.vector_norm((x - torch.randn(x.shape, generator=gen(2))).flatten(1), dim=1).mean()
        assert torch.allclose(stats_["random_dist"], random, rtol=1e-4)  # candidate 0 is the vanilla draw


def test_centred_needs_the_data_mean():
    assert needs_center(KNNAssigner(k=8, knn_score="centred"))
    assert not needs_center(KNNAssigner(k=1, knn_score="centred")) and not needs_center(KNNAssigner(k=8))
    with pytest.raises(ValueError, match="data mean"):
        knn.pair(torch.zeros(2, 1, 4, 4), KNNAssigner(k=4, knn_score="centred"), gen())


def test_center_for_scales_the_mean_only_for_rules_that_score_against_it():
    mean = torch.randn(1, 4, 4, generator=gen(5))
    asked = []

    def computed() -> torch.Tensor:
        asked.append(True)
        return mean

    assert center_for(KNNAssigner(k=8), computed) is None and center_for(VanillaAssigner(image_scale=2), mean) is None
    assert not asked  # the mean of a training set is not computed for a rule that does not use it
    centred = KNNAssigner(k=8, knn_score="centred", image_scale=1.7)
    assert torch.equal(center_for(centred, computed), mean * 1.7) and asked == [True]
    assert center_for(centred.model_copy(update={"image_scale": 1.0}), mean) is mean


def test_mean_image_is_the_flip_symmetric_mean_in_model_space_and_deterministic():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    images[:, :, :, 0] = 255  # left column white, right column black
    data = ImageSet(images, torch.zeros(4, dtype=torch.long), 0, "t")
    assert torch.equal(mean_image(data, hflip=False), torch.tensor([[[1.0, -1.0], [1.0, -1.0]]]))
    assert torch.equal(mean_image(data, hflip=True), torch.zeros(1, 2, 2))
    big = ImageSet(torch.randint(0, 256, (50, 1, 3, 3), generator=gen(1), dtype=torch.uint8),
                   torch.zeros(50, dtype=torch.long), 0, "t")
    capped = mean_image(big, hflip=False, cap=20)
    assert tensor_digest(capped) == tensor_digest(mean_image(big, hflip=False, cap=20))
    assert not torch.equal(capped, mean_image(big, hflip=False))
