"""Part 2's preregistered decision, recomputed from the committed runs (fid.jsonl files only; no torch).

    python docs/results/fashion-mnist/part2_decision.py            # markdown table on stdout

For each rule (run name) against vanilla, paired by seed:
- s = 1 (primary): per seed, the kimg at which the rule's FID curve (N(0, I) start, 2,000 images) first reaches
  the same seed's vanilla FID at 60 kimg, linearly interpolated between FID points (never extrapolated), and the
  speed-up 60 / that kimg ('not reached' when it never does). The decision follows the study file: FASTER when
  the median over 3 pairs is above 1 and the 90% percentile-bootstrap interval of the median excludes 1, SLOWER
  when the median is below 1 and the interval excludes 1, else no detectable difference ('not reached' ranks below
  every speed-up; fewer than 3 pairs: 'no decision').
- matched start (secondary): the rule's FID at 60 kimg with sample.start=matched minus the same seed's vanilla FID
  at 60 kimg (N(0, I)). BETTER when all 3 differences are below 0, WORSE when all are above 0 ('no decision' with
  fewer than 3: part 1's runs finished before networks were kept, so they have no matched-start point).
The bootstrap uses 10,000 resamples seeded 0, as `compare` does for its interval.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "runs"
RULES = ("knn8c", "knn8d", "linear", "scale2", "knn8", "knn8-kept", "knn32")
FINAL_KIMG = 60.0


def rows(run: str) -> list[dict]:
    path = RUNS / run / "fid.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run: str, start: str = "standard") -> list[tuple[float, float]]:
    """(kimg, FID) of the run's 2,000-image points at start_std 1 with the given start, by kimg."""
    points = {}
    for row in rows(run):
        sampling = row.get("sampling", {})
        if (row.get("num_images") == 2000 and sampling.get("start_std", 1.0) == 1.0
                and sampling.get("start", "standard") == start):
            points[round(row["kimg"], 3)] = row["fid"]
    return sorted(points.items())


def kimg_to(points: list[tuple[float, float]], target: float) -> float | None:
    if points and points[0][1] <= target:
        return points[0][0]
    for (k0, f0), (k1, f1) in zip(points, points[1:]):
        if f0 > target >= f1:
            return k0 + (f0 - target) / (f0 - f1) * (k1 - k0)
    return None


def final(points: list[tuple[float, float]]) -> float | None:
    ends = [f for k, f in points if abs(k - FINAL_KIMG) < 0.1]
    return ends[-1] if ends else None


def median_rank(values: list[float | None]) -> float | None:
    """Median with None ('not reached') below every number; None when the median itself is 'not reached'."""
    ordered = sorted(values, key=lambda v: (v is not None, v if v is not None else 0.0))
    middle = ordered[len(ordered) // 2] if len(ordered) % 2 else None
    if len(ordered) % 2 == 0:
        low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
        middle = None if low is None or high is None else (low + high) / 2
    return middle


def bootstrap(values: list[float | None]) -> tuple[float | None, float | None]:
    rng = random.Random(0)
    medians = [median_rank([rng.choice(values) for _ in values]) for _ in range(10_000)]
    medians.sort(key=lambda v: (v is not None, v if v is not None else 0.0))
    return medians[int(0.05 * len(medians))], medians[int(0.95 * len(medians)) - 1]


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "not reached" if value is None else f"{value:.{digits}f}{suffix}"


def decide(rule: str) -> dict:
    speedups, seeds, diffs = [], [], []
    for seed in (0, 1, 2):
        run, base = f"{rule}-s{seed}", f"vanilla-s{seed}"
        points, target = curve(run), final(curve(base))
        if target is None or final(points) is None:
            continue
        reached = kimg_to(points, target)
        seeds.append(seed)
        speedups.append(None if reached is None else FINAL_KIMG / reached)
        matched = final(curve(run, "matched"))
        if matched is not None:
            diffs.append((seed, matched - target))
    out = {"rule": rule, "seeds": seeds, "speedups": speedups, "diffs": [d for _, d in diffs],
           "diff_seeds": [s for s, _ in diffs]}
    if len(speedups) >= 3:
        med, (low, high) = median_rank(speedups), bootstrap(speedups)
        out["median"], out["interval"] = med, (low, high)
        if med is not None and med > 1 and low is not None and low > 1:
            out["decision"] = "FASTER"
        elif (med is None or med < 1) and (high is None or high < 1):
            out["decision"] = "SLOWER"
        else:
            out["decision"] = "no detectable difference"
    else:
        out["decision"] = f"no decision ({len(speedups)} of 3 pairs)"  # a one-seed rule, or runs still to come
    if len(diffs) >= 3:
        out["matched"] = ("BETTER" if all(d < 0 for _, d in diffs) else "WORSE" if all(d > 0 for _, d in diffs)
                          else "no detectable difference")
    else:
        out["matched"] = f"no decision ({len(diffs)} of 3 rescored)"  # part 1's runs kept no network
    return out


def main() -> None:
    print("| rule | seeds | per-seed speed-up at s = 1 | median [90% interval] | decision (s = 1) | "
          "matched - vanilla at 60 kimg (per seed) | mean ± sd | decision (matched) |")
    print("|---|---|---|---|---|---|---|---|")
    for rule in RULES:
        d = decide(rule)
        if not d["seeds"]:
            continue
        per_seed = ", ".join(fmt(v, 2, "x") for v in d["speedups"])
        interval = (f"{fmt(d['median'], 2, 'x')} [{fmt(d['interval'][0], 2, 'x')}, {fmt(d['interval'][1], 2, 'x')}]"
                    if "median" in d else "-")
        diffs = ", ".join(f"s{s} {v:+.2f}" for s, v in zip(d["diff_seeds"], d["diffs"])) or "-"
        spread = (f"{statistics.mean(d['diffs']):+.2f} ± {statistics.stdev(d['diffs']):.2f}"
                  if len(d["diffs"]) >= 2 else "-")
        print(f"| {rule} | {', '.join(map(str, d['seeds']))} | {per_seed} | {interval} | {d['decision']} | {diffs} | "
              f"{spread} | {d['matched']} |")


if __name__ == "__main__":
    sys.exit(main())
