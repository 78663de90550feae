"""The pure curve math of `immiscible compare`: where a FID curve reaches a target, the FID points either side of
that crossing, values read off a curve, speed-ups, and the mean curve of a seed group.

A curve reaches the target at its first point with FID <= target, linearly interpolated between that point and the
one before it. Nothing is ever extrapolated: a curve that never gets there has not reached it (None), and a curve
whose first evaluated point is already at or below the target reaches it at that point's kimg.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

Points = Sequence[tuple[float, float]]  # (x, y) sorted by x: (kimg, fid), (kimg, train_s), ...


@dataclass(frozen=True)
class Crossing:
    """Where a (kimg, fid) curve first gets to FID <= target, and the evaluated points either side of it.

    `before` is the last point above the target (None when the first point already meets it: nothing was measured
    earlier); `after` is the first point at or below it."""

    kimg: float
    before: tuple[float, float] | None
    after: tuple[float, float]

    @property
    def at_first_point(self) -> bool:
        return self.before is None

    def bracket(self) -> dict[str, Any]:
        """The two points as JSON: {"before": {"kimg", "fid"} or null, "after": {"kimg", "fid"}}."""
        def point(p: tuple[float, float] | None) -> dict[str, float] | None:
            return None if p is None else {"kimg": p[0], "fid": p[1]}
        return {"before": point(self.before), "after": point(self.after)}


def crossing(curve: Points, target: float) -> Crossing | None:
    """The first crossing of the target by a (kimg, fid) curve sorted by kimg; None if it never gets there."""
    for i, (kimg, fid) in enumerate(curve):
        if fid <= target:
            if i == 0:
                return Crossing(kimg, None, (kimg, fid))
            prev_kimg, prev_fid = curve[i - 1]  # prev_fid > target >= fid, so the fraction lies in (0, 1]
            at = prev_kimg + (prev_fid - target) / (prev_fid - fid) * (kimg - prev_kimg)
            return Crossing(at, (prev_kimg, prev_fid), (kimg, fid))
    return None


def kimg_to_reach(curve: Points, target: float) -> float | None:
    """kimg at which a (kimg, fid) curve sorted by kimg first gets to FID <= target; None if it never does.

    Interpolated linearly between the crossing point and the point before it; never extrapolated: when the first
    point already meets the target, the answer is that point's kimg, not an earlier guess."""
    found = crossing(curve, target)
    return None if found is None else found.kimg


def value_at(points: Points, x: float) -> tuple[float, bool] | None:
    """(y, interpolated) of a piecewise-linear curve at x; None outside the curve's x range."""
    for i, (px, py) in enumerate(points):
        if math.isclose(px, x, rel_tol=1e-9, abs_tol=1e-9):
            return py, False
        if px > x:
            if i == 0:
                return None
            qx, qy = points[i - 1]
            return qy + (x - qx) / (px - qx) * (py - qy), True
    return None


def speedup(baseline_cost: float | None, run_cost: float | None) -> float | None:
    """Baseline's kimg (or seconds) to the target over this run's; None when either never got there."""
    if baseline_cost is None or run_cost is None or run_cost <= 0:
        return None
    return baseline_cost / run_cost


def shared_kimg_points(kimg_lists: Sequence[Sequence[float]], limit: int = 4) -> list[float]:
    """Up to `limit` evaluated kimg values inside the range every curve covers, spread evenly and always including
    the furthest kimg all curves reached; a curve without a point exactly there is read by interpolation."""
    low, high = max(ks[0] for ks in kimg_lists), min(ks[-1] for ks in kimg_lists)
    candidates = sorted({round(k, 6) for ks in kimg_lists for k in ks if low <= k <= high})
    if len(candidates) <= limit:
        return candidates
    step = (len(candidates) - 1) / (limit - 1)
    return [candidates[round(i * step)] for i in range(limit)]


@dataclass
class Curve:
    """One FID curve in kimg order; `fid_std` is the spread over seeds (None for a single run)."""

    kimg: list[float]
    fid: list[float]
    train_s: list[float | None]
    fid_std: list[float] | None = None

    def points(self) -> list[tuple[float, float]]:
        return list(zip(self.kimg, self.fid))

    def time_points(self) -> list[tuple[float, float]]:
        """(kimg, training seconds) where the seconds are known."""
        return [(k, s) for k, s in zip(self.kimg, self.train_s) if s is not None]

    def seconds_at(self, kimg: float | None) -> float | None:
        """Training seconds at a kimg (interpolated between known seconds); None if unknown there."""
        found = value_at(self.time_points(), kimg) if kimg is not None else None
        return found[0] if found else None


def mean_curve(curves: Sequence[Curve]) -> Curve | None:
    """Mean and sample std (ddof 1) over seeds, at every kimg any seed evaluated inside the range all seeds cover
    (a seed without a point exactly there is interpolated); None when the seeds share no kimg range."""
    low, high = max(c.kimg[0] for c in curves), min(c.kimg[-1] for c in curves)
    if low > high:
        return None
    grid = sorted({round(k, 6) for c in curves for k in c.kimg if low <= k <= high})
    fids = [[value_at(c.points(), k)[0] for c in curves] for k in grid]
    seconds = [[value_at(c.time_points(), k) for c in curves] for k in grid]
    return Curve(kimg=grid, fid=[statistics.fmean(f) for f in fids], fid_std=[statistics.stdev(f) for f in fids],
                 train_s=[statistics.fmean(s[0] for s in per_seed) if all(per_seed) else None
                          for per_seed in seconds])
