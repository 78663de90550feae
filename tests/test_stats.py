"""Streaming feature statistics: equal to np.mean/np.cov, and the memory of an FID point does not grow with N."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from immiscible_cli.metrics import FeatureStats, FIDExtractor, MetricsError, WeightsInfo, feature_stats


def test_streamed_sums_equal_numpy_mean_and_cov_in_any_batching():
    rng = np.random.default_rng(0)
    features = rng.normal(5.0, 2.0, (257, 6))  # an offset mean: the case a plain sum of squares gets wrong
    expected_mu, expected_sigma = feature_stats(features)
    for batch in (1, 7, 257):
        stats = FeatureStats()
        for start in range(0, len(features), batch):
            stats.update(features[start:start + batch])
        mu, sigma = stats.mean_cov()
        np.testing.assert_allclose(mu, expected_mu, rtol=1e-13)
        np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-11, atol=1e-13)
    with pytest.raises(MetricsError, match="at least 2"):
        FeatureStats().mean_cov()
    with pytest.raises(MetricsError, match="expected rows"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(MetricsError, match="without keeping"):
        stats.features()


def test_saved_partial_sums_continue_exactly(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 4))
    whole = FeatureStats()
    whole.update(features)
    first = FeatureStats()
    first.update(features[:15])
    first.save(tmp_path / "p.npz")
    resumed = FeatureStats.load(tmp_path / "p.npz")
    resumed.update(features[15:])
    assert resumed.count == 40
    for a, b in zip(resumed.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _peak_bytes(extractor: FIDExtractor, count: int) -> int:
    def batches():
        for start in range(0, count, 50):
            yield torch.full((min(50, count - start), 1, 8, 8), start % 255, dtype=torch.uint8)
    tracemalloc.start()
    try:
        stats = extractor.stats(batches())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.count == count
    return peak


def test_peak_memory_of_streamed_statistics_does_not_grow_with_the_image_count():
    """2048-d features of 200 vs 1,000 images: holding them would add 13 MB; streaming adds nothing."""
    def network(x: torch.Tensor) -> torch.Tensor:  # [B, 3, 299, 299] -> [B, 2048], like the Inception trunk
        return x[:, :, :32, :64].flatten(1)[:, :2048]

    extractor = FIDExtractor("legacy_tensorflow", network=network, info=WeightsInfo("stub", "", "0" * 64, "float32"),
                             batch_size=50)
    _peak_bytes(extractor, 100)  # warm-up: one-off allocations
    small, large = _peak_bytes(extractor, 200), _peak_bytes(extractor, 1000)
    held = 800 * 2048 * 8
    assert large - small < held / 10, (small, large)
