"""`immiscible compare`: line up the FID curves of several runs and say how much faster each reaches a target FID.

Speed-up is the papers' "x times faster": the kimg the baseline needs to reach a target FID (default: the
baseline's best FID) over the kimg this run needs; the same ratio in training seconds (FID time excluded) is the
wall-clock speed-up. A curve reaches the target at its first point with FID <= target, linearly interpolated between
that point and the one before it (those two points are reported as the crossing's bracket). Nothing is ever
extrapolated: a curve that never gets there has "not reached", and a curve whose first evaluated point is already at
or below the target reaches it at that point's kimg (nothing was measured earlier, so we do not guess how much
earlier; such a row is flagged, since its true cost may be lower).

Runs whose configs differ only in their seed form a group, compared through its mean curve; when the baseline and
another group both have several seeds, runs sharing a seed are also compared pair by pair (compare_seeds.py).
This module is the command's library (`main`); the curve math is in compare_curves.py, the FID rows compared in
compare_rows.py, reading runs into curves and seed groups in compare_runs.py, the per-seed statistics in
compare_seeds.py; compare_table.py turns the rows computed here into the table and CSV, compare_plot.py into the
figure; the JSON document is the rows themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Sequence

from rich.console import Console

from .compare_curves import (Crossing, Curve, Points, crossing, kimg_to_reach, mean_curve, shared_kimg_points,
                             speedup, value_at)
from .compare_plot import PlotLine, write_plot
from .compare_rows import CompareError, choose_fid_rows, describe_differences, fid_rows
from .compare_runs import (THROUGHPUT_SPREAD_WARNING, Entry, Member, assigner_label, curve_from_rows, experiment_key,
                           load_entries, open_runs)
from .compare_seeds import make_pair, pair_by_seed, summarize
from .compare_table import csv_text, print_table
from .files import check_writable

__all__ = ["CompareError", "Crossing", "Curve", "Entry", "Member", "Points", "assigner_label", "choose_fid_rows",
           "cost_to_reach", "crossing", "curve_from_rows", "describe_differences", "experiment_key", "fid_rows",
           "kimg_to_reach", "load_entries", "main", "mean_curve", "seed_block", "shared_kimg_points", "speedup",
           "summary_row", "value_at"]


def cost_to_reach(curve: Curve, target: float) -> tuple[float | None, float | None]:
    """(kimg, training seconds) at which the curve reaches the target; seconds are read at that kimg."""
    kimg = kimg_to_reach(curve.points(), target)
    return kimg, curve.seconds_at(kimg)


def seed_block(entry: Entry, base: Entry, target: float | None, err: Console) -> dict[str, Any] | None:
    """The per-seed comparison of a group with the baseline group, when both have several seeds; None otherwise
    (and for the baseline itself). Runs left without a same-seed partner are named in a warning."""
    if entry is base or len(entry.seeds) < 2 or len(base.seeds) < 2:
        return None
    pairs, unpaired = pair_by_seed(base.seeds, entry.seeds)
    if unpaired:
        err.print(f"warning: {', '.join(f'{m.name} (seed {m.seed})' for m in unpaired)}: no run with the same seed "
                  f"on the other side of {base.name} vs {entry.name} (or a seed used twice), so left out of its "
                  f"per-seed speed-ups", markup=False, highlight=False)
    return summarize([make_pair(b, r, target) for b, r in pairs], unpaired, baseline=base.name,
                     target_given=target is not None)


def summary_row(entry: Entry, target: float, baseline: tuple[float | None, float | None],
                at_kimg: list[float]) -> dict[str, Any]:
    """One run's (or group's) line: best/final FID, FID at shared kimg, cost to the target, speed-ups.

    `baseline` is the baseline's (kimg, training seconds) to the target."""
    curve, std = entry.curve, entry.curve.fid_std
    best = min(range(len(curve.fid)), key=curve.fid.__getitem__)  # the first minimum
    crossed = crossing(curve.points(), target)
    kimg = crossed.kimg if crossed else None
    seconds = curve.seconds_at(kimg)
    shared = []
    for k in at_kimg:
        fid, interpolated = value_at(curve.points(), k)
        spread = value_at(list(zip(curve.kimg, std)), k)[0] if std else None
        shared.append({"kimg": k, "fid": fid, "fid_std": spread, "interpolated": interpolated})
    return {
        "run": entry.name, "members": entry.members, "n_seeds": len(entry.members),
        "member_seeds": [m.seed for m in entry.seeds],
        "assigner": assigner_label(entry.config), "objective": (entry.config.get("objective") or {}).get("kind"),
        "batch_size": (entry.config.get("train") or {}).get("batch_size"), "kimg_trained": entry.kimg_trained,
        "best_fid": curve.fid[best], "best_fid_std": std[best] if std else None, "best_kimg": curve.kimg[best],
        "final_fid": curve.fid[-1], "final_fid_std": std[-1] if std else None, "final_kimg": curve.kimg[-1],
        "fid_at_kimg": shared, "kimg_to_target": kimg, "seconds_to_target": seconds,
        "target_bracket": crossed.bracket() if crossed else None,
        "target_at_first_point": curve.fid[0] <= target,  # then the true crossing may lie earlier: not extrapolated
        "speedup": speedup(baseline[0], kimg), "speedup_wallclock": speedup(baseline[1], seconds),
        "settings": entry.settings, "seeds": None,
    }


def _check_options(target: float | None, plot: Path | None) -> None:
    if target is not None and not (math.isfinite(target) and target > 0):
        raise CompareError(f"--target must be a positive FID, got {target:g}")
    if plot is not None and (plot.suffix.lower() != ".png" or not plot.parent.is_dir()):
        raise CompareError(f"--plot {plot}: give a .png file in an existing folder")
    if plot is not None:
        check_writable(plot, "file", "--plot")  # a folder of that name, a read-only or full disk: before any work


def _entries(runs: list[Path], baseline: Path | None, *, strict: bool, err: Console,
             where: Sequence[str] = ()) -> tuple[list[Entry], Entry]:
    """The runs as entries (seed groups merged) and the baseline's entry."""
    opened, base_index = open_runs(list(runs), baseline)
    if len(opened) < 2:
        raise CompareError(f"compare needs at least two runs, got {len(opened)}; give another run to compare with")
    # the directory name, unless two runs share it (e.g. exp1/00001-x and exp2/00001-x)
    names = [r.name if sum(q.name == r.name for q in opened) == 1 else str(r.path) for r in opened]
    entries = load_entries(opened, names, strict=strict, err=err, where=where)
    if len(entries) < 2:
        raise CompareError(f"runs {', '.join(entries[0].members)} differ only in their seed: nothing to compare "
                           f"them with; add a run of another config")
    return entries, next(e for e in entries if names[base_index] in e.members)


def _plot_lines(entries: list[Entry], rows: list[dict[str, Any]]) -> list[PlotLine]:
    return [PlotLine(e.label, e.curve.kimg, e.curve.fid, e.curve.fid_std, e.curve.train_s, r["kimg_to_target"],
                     r["seconds_to_target"], [(m.curve.kimg, m.curve.fid) for m in e.seeds] if len(e.seeds) > 1
                     else []) for e, r in zip(entries, rows)]


def main(runs: list[Path], *, target: float | None, baseline: Path | None, plot: Path | None,
         fmt: Literal["table", "json", "csv"], strict: bool, out: Console, err: Console,
         where: Sequence[str] = ()) -> None:
    """Compare runs' FID curves: a table, JSON or CSV on `out`, warnings on `err`, and optionally a PNG plot.

    The baseline defaults to the first run; the target FID to the best FID of the baseline's (mean) curve, and per
    seed pair to the baseline seed's own best FID. `where` keeps only the FID points scored with those settings
    (`sampling.start_std=0.98`: the curves of an `eval --set` rescoring)."""
    _check_options(target, plot)
    entries, base = _entries(runs, baseline, strict=strict, err=err, where=where)
    target_fid = target if target is not None else min(base.curve.fid)
    base_cost = cost_to_reach(base.curve, target_fid)
    if base_cost[0] is None:
        err.print(f"warning: the baseline {base.name} never reaches FID {target_fid:.2f}, so speed-ups are "
                  f"undefined; choose a larger --target", markup=False, highlight=False)
    at_kimg = shared_kimg_points([e.curve.kimg for e in entries])
    rows = [summary_row(e, target_fid, base_cost, at_kimg) for e in entries]
    busy = [e for e in entries if e.throughput_spread is not None and e.throughput_spread > THROUGHPUT_SPREAD_WARNING]
    if busy:
        spreads = ", ".join(f"{e.name} {e.throughput_spread:.1f}x" for e in busy)
        err.print(f"warning: training speed varied between ticks ({spreads} fastest over slowest img/s): the machine was shared part of the time, so their time "
                  f"speed-ups measure the machine as much as the method", markup=False, highlight=False)
    for entry, row in zip(entries, rows):
        row["seeds"] = seed_block(entry, base, target, err)
    if plot is not None:  # before printing: if writing fails, nothing has reached stdout yet
        write_plot(plot, _plot_lines(entries, rows), target_fid, base.name)
    document = {"baseline": base.name, "target": target_fid,
                "target_source": "baseline best FID" if target is None else "--target", "runs": rows}
    if where:  # only then, so a plain comparison's document is what it always was
        document["where"] = list(where)
    if fmt == "json":
        out.file.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
    elif fmt == "csv":
        out.file.write(csv_text(document))
    else:
        print_table(document, out)
    if plot is not None:
        (out if fmt == "table" else err).print(f"plot: {plot}", markup=False, highlight=False)
