"""The 120-kimg extension (studies/fmnist-cpu-long.yaml), recomputed from the committed fid.jsonl files (no torch).

    python docs/results/fashion-mnist/long/extension.py            # markdown tables on stdout

1. Repeat check: a 120-kimg run's first 60 kimg are the 60-kimg run's (same seed, preset and code; the learning rate
   is constant after warm-up), so its FID points at 12-60 kimg are set beside part 1's run of the same rule and seed.
2. The FID of vanilla and scale2 at every point (N(0, I) start, 2,000 images) and scale2's gap (scale2 - vanilla).
3. The speed-up to vanilla's FID at each of its points from 24 kimg on, and at its last point (what the study's
   `compare` reports, its target being vanilla's best FID): the kimg at which scale2's curve first reaches that FID,
   linearly interpolated between points (never extrapolated), and vanilla's kimg / that.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PART1 = HERE.parent / "runs"
sys.path.insert(0, str(HERE.parent))
from part2_decision import kimg_to  # noqa: E402  (the crossing rule part 2's decision uses: one definition)


def curve(path: Path) -> list[tuple[float, float]]:
    """(kimg, FID) of the run's 2,000-image points at the N(0, I) start with DDIM-20, by kimg."""
    if not (path / "fid.jsonl").is_file():
        return []
    points = {}
    for line in (path / "fid.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else None
        if row is None:
            continue
        sampling = row.get("sampling", {})
        if (row.get("num_images") == 2000 and sampling.get("start_std", 1.0) == 1.0
                and sampling.get("start", "standard") == "standard" and row.get("sampler") == "ddim"
                and row.get("steps") == 20):
            points[round(row["kimg"], 3)] = row["fid"]
    return sorted(points.items())


def main() -> None:
    print("Repeat check: the 120-kimg runs' points at 12-60 kimg beside part 1's 60-kimg runs (same seed 0)\n")
    print("| rule | kimg | part 1 | 120-kimg run | difference |")
    print("|---|---|---|---|---|")
    for rule in ("vanilla", "scale2"):
        old, new = dict(curve(PART1 / f"{rule}-s0")), dict(curve(HERE / "runs" / f"{rule}-s0"))
        for kimg in sorted(old):
            if kimg in new:
                print(f"| {rule} | {kimg:g} | {old[kimg]:.3f} | {new[kimg]:.3f} | {new[kimg] - old[kimg]:+.3f} |")
    van, sc = curve(HERE / "runs" / "vanilla-s0"), curve(HERE / "runs" / "scale2-s0")
    print("\nFID at each point (N(0, I) start, 2,000 images, DDIM-20)\n")
    print("| kimg | vanilla | scale2 | scale2 - vanilla |")
    print("|---|---|---|---|")
    scale2 = dict(sc)
    for kimg, fid in van:
        other = scale2.get(kimg)
        print(f"| {kimg:g} | {fid:.2f} | {'-' if other is None else f'{other:.2f}'} | "
              f"{'-' if other is None else f'{other - fid:+.2f}'} |")
    print("\nSpeed-up to vanilla's FID at each of its points (scale2's kimg to reach it, interpolated; a crossing "
          "between two points of the 12-kimg grid scores within a range: e.g. 1.00x-1.11x at 120 kimg)\n")
    print("| vanilla at kimg | its FID | scale2 reaches it at kimg | speed-up |")
    print("|---|---|---|---|")
    for kimg, fid in van[1:]:
        reached = kimg_to(sc, fid)
        print(f"| {kimg:g} | {fid:.2f} | {'not reached' if reached is None else f'{reached:.1f}'} | "
              f"{'not reached' if reached is None else f'{kimg / reached:.2f}x'} |")
    if van and sc and van[-1][0] == sc[-1][0]:
        last, target = van[-1]
        reached = kimg_to(sc, target)
        speed = "not reached" if reached is None else f"{last / reached:.2f}x (at {reached:.1f} kimg)"
        print(f"\nscale2 reaches vanilla's FID at {last:g} kimg ({target:.2f}): {speed}")
    else:
        print("\nspeed-up: pending (both runs must reach the same last point)")


if __name__ == "__main__":
    main()
