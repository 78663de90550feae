"""Metrics: FID (and KID) with clean-fid's pipeline, our own Inception trunk, streaming statistics and cached
reference statistics. Layers, bottom up: inception (network), weights (lookup) -> features (resize, extractor) -> stats
(streaming mean/covariance, distances) -> reference (cache) -> scorer (an FID point of a network, its fid.jsonl row).
"""

from .features import MODES, FIDExtractor
from ..errors import MetricsError
from .weights import FIDWeightsError, WeightsInfo, load_inception, resolve_weights
from .reference import FIDReferenceError, ReferenceKey, cleanfid_reference, reference_stats
from .stats import (FeatureStats, compute_kid, feature_stats, fid_from_features, frechet_distance,
                    frechet_distance_eigh)

__all__ = [
    "MODES", "FIDExtractor", "FIDReferenceError", "FIDWeightsError", "FeatureStats", "MetricsError", "ReferenceKey",
    "WeightsInfo", "cleanfid_reference", "compute_kid", "feature_stats", "fid_from_features", "frechet_distance",
    "frechet_distance_eigh",
    "load_inception", "reference_stats", "resolve_weights",
]
