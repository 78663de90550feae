"""Metrics: FID (and KID) with clean-fid's pipeline, our own Inception trunk, and cached reference statistics."""

from .fid import (
    MODES,
    FIDExtractor,
    FIDReferenceError,
    ReferenceKey,
    cache_root,
    cleanfid_reference,
    compute_kid,
    feature_stats,
    fid_from_features,
    frechet_distance,
    reference_stats,
)
from .inception import FIDWeightsError, MetricsError, WeightsInfo, load_inception, resolve_weights

__all__ = [
    "MODES", "FIDExtractor", "FIDReferenceError", "FIDWeightsError", "MetricsError", "ReferenceKey", "WeightsInfo",
    "cache_root", "cleanfid_reference", "compute_kid", "feature_stats", "fid_from_features", "frechet_distance",
    "load_inception", "reference_stats", "resolve_weights",
]
