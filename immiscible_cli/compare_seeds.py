"""Per-seed speed-ups of `immiscible compare`: runs of the baseline group and of another group that share a seed
(and so their random numbers) form a pair; each pair has its own speed-up, and a group has their median, their
min-max spread and a percentile bootstrap interval of the median.

Each pair's target is the baseline seed's own best FID (what the papers do with one run), or the user's --target.
Honesty rules: a pair whose run never reaches the target is "not reached" (JSON null) and ranks below every reached
speed-up, so the median is "not reached" when at least half of the pairs are; it is never dropped. A pair whose
baseline seed never reaches a --target has no speed-up at all ("baseline not reached") and is counted apart. With
fewer than `MIN_REACHED` reached pairs there is no interval: a bootstrap of two numbers says nothing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from .compare_curves import Crossing, crossing, speedup
from .compare_runs import Member

LEVEL = 0.90  # two-sided coverage of the bootstrap interval
RESAMPLES = 2000  # bootstrap resamples of the pairs, drawn with replacement
RNG_SEED = 0  # fixed, so the same runs always print the same interval
MIN_REACHED = 3  # fewer reached pairs than this: no interval

REACHED, NOT_REACHED, BASELINE_NOT_REACHED = "reached", "not reached", "baseline not reached"


@dataclass
class SeedPair:
    """A baseline run and a run of another group with the same seed, both read at the pair's target FID."""

    seed: Any
    baseline: Member
    run: Member
    target: float
    baseline_crossing: Crossing | None
    run_crossing: Crossing | None

    @property
    def status(self) -> str:
        if self.baseline_crossing is None:
            return BASELINE_NOT_REACHED
        return NOT_REACHED if self.run_crossing is None else REACHED

    @property
    def speedup(self) -> float | None:
        """Baseline seed's kimg to the target over this run's; None unless both got there."""
        if self.baseline_crossing is None or self.run_crossing is None:
            return None
        return speedup(self.baseline_crossing.kimg, self.run_crossing.kimg)

    def as_json(self) -> dict[str, Any]:
        base, run = self.baseline_crossing, self.run_crossing
        base_s = self.baseline.curve.seconds_at(base.kimg if base else None)
        run_s = self.run.curve.seconds_at(run.kimg if run else None)
        return {
            "seed": self.seed, "baseline_run": self.baseline.name, "run": self.run.name, "target": self.target,
            "baseline_kimg_to_target": base.kimg if base else None,
            "baseline_bracket": base.bracket() if base else None,
            "kimg_to_target": run.kimg if run else None, "bracket": run.bracket() if run else None,
            "target_at_first_point": bool(run and run.at_first_point), "status": self.status,
            "speedup": self.speedup, "speedup_wallclock": speedup(base_s, run_s),
        }


def pair_by_seed(baseline: Sequence[Member], runs: Sequence[Member]) -> tuple[list[tuple[Member, Member]],
                                                                              list[Member]]:
    """(baseline run, run) pairs sharing a seed, in the order of `runs`, and every run of either side left without
    a partner: its seed is missing on the other side, or repeated on its own (which of two would it pair with?)."""
    def once(members: Sequence[Member]) -> dict[Any, Member]:
        seeds = [m.seed for m in members]
        return {m.seed: m for m in members if seeds.count(m.seed) == 1}

    base_by_seed, run_by_seed = once(baseline), once(runs)
    pairs = [(base_by_seed[m.seed], m) for m in runs if m.seed in base_by_seed and m.seed in run_by_seed]
    paired = {id(m) for pair in pairs for m in pair}
    return pairs, [m for m in [*baseline, *runs] if id(m) not in paired]


def make_pair(base: Member, run: Member, target: float | None) -> SeedPair:
    """The pair read at `target`, or at the baseline seed's own best FID when no target is given."""
    at = target if target is not None else min(base.curve.fid)
    return SeedPair(run.seed, base, run, at, crossing(base.curve.points(), at), crossing(run.curve.points(), at))


def _rank(value: float | None) -> float:
    return -math.inf if value is None else value  # not reached: below every reached speed-up


def _median_of_ranks(ranks: Sequence[float]) -> float:
    ordered = sorted(ranks)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2  # -inf stays -inf


def ranked_median(values: Sequence[float | None]) -> float | None:
    """Median of speed-ups where None (not reached) ranks lowest: None when at least half are not reached."""
    median = _median_of_ranks([_rank(v) for v in values])
    return None if median == -math.inf else median


def bootstrap_interval(values: Sequence[float | None], *, level: float = LEVEL, resamples: int = RESAMPLES,
                       rng_seed: int = RNG_SEED) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of `ranked_median`: resample the pairs with replacement `resamples` times with
    a fixed RNG seed and keep the central `level` of the medians. A bound of None is "not reached"."""
    rng, ranks = random.Random(rng_seed), [_rank(v) for v in values]
    medians = sorted(_median_of_ranks(rng.choices(ranks, k=len(ranks))) for _ in range(resamples))
    tail = round((1 - level) / 2 * resamples)
    low, high = medians[tail], medians[resamples - 1 - tail]
    return (None if low == -math.inf else low), (None if high == -math.inf else high)


def summarize(pairs: Sequence[SeedPair], unpaired: Sequence[Member], *, baseline: str,
              target_given: bool) -> dict[str, Any]:
    """A group's per-seed block of the JSON document: the pairs, their median, spread and bootstrap interval."""
    rated = [p.speedup for p in pairs if p.status != BASELINE_NOT_REACHED]
    reached = [v for v in rated if v is not None]
    median = ranked_median(rated) if rated else None
    interval = None
    if len(reached) >= MIN_REACHED:
        low, high = bootstrap_interval(rated)
        interval = {"level": LEVEL, "low": low, "high": high, "resamples": RESAMPLES, "rng_seed": RNG_SEED,
                    "method": "percentile bootstrap of the median, resampling seed pairs with replacement"}
    return {
        "baseline": baseline, "target_source": "--target" if target_given else "each baseline seed's best FID",
        "pairs": [p.as_json() for p in pairs], "unpaired": [{"run": m.name, "seed": m.seed} for m in unpaired],
        "n_pairs": len(pairs), "n_reached": len(reached), "n_not_reached": len(rated) - len(reached),
        "n_baseline_not_reached": len(pairs) - len(rated),
        "median": median, "median_not_reached": bool(rated) and median is None,
        "min": min(rated, key=_rank) if rated else None, "max": max(rated, key=_rank) if rated else None,
        "interval": interval,
        "interval_unavailable": None if interval else f"{len(reached)} reached pair(s); the bootstrap needs at "
                                                      f"least {MIN_REACHED}",
    }
