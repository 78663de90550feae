"""`immiscible compare`: line up the FID curves of several runs and say how much faster each reaches a target FID.

Speed-up is the papers' "x times faster": the kimg the baseline needs to reach a target FID (default: the
baseline's best FID) over the kimg this run needs; the same ratio in training seconds (FID time excluded) is the
wall-clock speed-up. A curve reaches the target at its first point with FID <= target, linearly interpolated between
that point and the one before it. Nothing is ever extrapolated: a curve that never gets there has "not reached", and
a curve whose first evaluated point is already at or below the target reaches it at that point's kimg (nothing was
measured earlier, so we do not guess how much earlier; such a row is flagged, since its true cost may be lower).

Only FIDs scored with the same settings (`metrics.scorer.FID_SETTINGS`) are compared; runs whose configs differ only in their
seed form a group, compared through its mean curve. compare_plot.py turns the rows computed here into the table,
CSV and figure; the JSON document is the rows themselves.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from rich.console import Console

from .compare_plot import PlotLine, csv_text, print_table, write_plot
from .errors import UserError
from .metrics.scorer import fid_settings, read_fid_rows
from .runs import Run, open_run


class CompareError(UserError):
    """Runs that cannot be compared as asked; the one-line message says why and what to do."""


Points = Sequence[tuple[float, float]]  # (x, y) sorted by x: (kimg, fid), (kimg, train_s), ...


# ------------------------------------------------------------------------------------------------------------------
# the speed-up core: small pure functions


def kimg_to_reach(curve: Points, target: float) -> float | None:
    """kimg at which a (kimg, fid) curve sorted by kimg first gets to FID <= target; None if it never does.

    Interpolated linearly between the crossing point and the point before it; never extrapolated: when the first
    point already meets the target, the answer is that point's kimg, not an earlier guess."""
    for i, (kimg, fid) in enumerate(curve):
        if fid <= target:
            if i == 0:
                return kimg
            prev_kimg, prev_fid = curve[i - 1]  # prev_fid > target >= fid, so the fraction lies in (0, 1]
            return prev_kimg + (prev_fid - target) / (prev_fid - fid) * (kimg - prev_kimg)
    return None


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


# ------------------------------------------------------------------------------------------------------------------
# reading runs


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fid_rows(run: Run) -> list[dict[str, Any]]:
    """The run's fid.jsonl rows that hold a usable number (a failed evaluation may have written NaN)."""
    return [r for r in read_fid_rows(run) if _number(r.get("fid")) and _number(r.get("kimg"))]


def curve_from_rows(rows: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> Curve:
    """Sort by kimg (rows may be out of order; a re-scored kimg keeps its latest row). Training seconds come from the
    FID row, or else are interpolated from metrics.jsonl ticks."""
    by_kimg = {round(float(r["kimg"]), 6): r for r in rows}
    ticks = sorted((m["kimg"], m["train_s"]) for m in metrics if _number(m.get("kimg")) and _number(m.get("train_s")))
    kimg = sorted(by_kimg)
    train_s = []
    for k in kimg:
        known = by_kimg[k].get("train_s")
        from_ticks = value_at(ticks, k)
        train_s.append(float(known) if _number(known) else from_ticks[0] if from_ticks else None)
    return Curve(kimg=kimg, fid=[float(by_kimg[k]["fid"]) for k in kimg], train_s=train_s)


def _settings_key(row: dict[str, Any]) -> str:
    return json.dumps(fid_settings(row), sort_keys=True)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def describe_differences(settings_by_run: dict[str, dict[str, Any]]) -> str:
    """'num_images (a: 10000, b: 50000); sampler (...)': each setting that differs, with every run's value."""
    flat = {name: _flatten(s) for name, s in settings_by_run.items()}
    keys = sorted({key for f in flat.values() for key in f})
    parts = [f"{key} ({', '.join(f'{name}: {f.get(key)}' for name, f in flat.items())})"
             for key in keys if len({json.dumps(f.get(key)) for f in flat.values()}) > 1]
    return "; ".join(parts)


def choose_fid_rows(rows_by_run: dict[str, list[dict[str, Any]]], *, strict: bool,
                    err: Console) -> dict[str, list[dict[str, Any]]]:
    """Keep one FID settings combination per run: the one all runs share (the one with most points if several are),
    else each run's most common one, with a warning naming what differs (a CompareError when strict)."""
    counts = {name: Counter(_settings_key(r) for r in rows) for name, rows in rows_by_run.items()}
    shared = set.intersection(*(set(c) for c in counts.values()))
    if shared:
        best = max(sorted(shared), key=lambda key: sum(c[key] for c in counts.values()))
        chosen = dict.fromkeys(counts, best)
    else:
        chosen = {name: c.most_common(1)[0][0] for name, c in counts.items()}
        differences = describe_differences({name: json.loads(key) for name, key in chosen.items()})
        if strict:
            raise CompareError(f"FID settings differ and no combination is shared by all runs: {differences}; "
                               f"score them alike with `immiscible eval`, or drop --strict")
        err.print(f"warning: FID settings differ, so these FIDs are not strictly comparable: {differences} "
                  f"(--strict refuses this)", markup=False, highlight=False)
    return {name: [r for r in rows if _settings_key(r) == chosen[name]] for name, rows in rows_by_run.items()}


# Fields that do not change what a run learns: runs differing only here (and in seed) are seeds of one experiment.
_NOT_THE_EXPERIMENT = ("name", "seed", "data.root", "train.keep_last", "train.keep_every_kimg")


def experiment_key(config: dict[str, Any]) -> str:
    """The config without its seed, name and bookkeeping fields, as canonical JSON."""
    trimmed = copy.deepcopy(config)
    for dotted in _NOT_THE_EXPERIMENT:
        *parents, leaf = dotted.split(".")
        node: Any = trimmed
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(trimmed, sort_keys=True, default=str)


def assigner_label(config: dict[str, Any]) -> str:
    """'vanilla', 'knn k=8', 'linear l2 fp16', 'vanilla x2' (image_scale 2)."""
    assigner = config.get("assigner") or {}
    name = assigner.get("name", "vanilla")
    parts = [name]
    if name == "knn":
        parts.append(f"k={assigner.get('k')}")
    elif name == "linear":
        parts.append(str(assigner.get("cost", "l2")))
        if assigner.get("quantize", "none") != "none":
            parts.append(str(assigner["quantize"]))
    scale = assigner.get("image_scale", 1.0)
    if _number(scale) and scale != 1:
        parts.append(f"x{scale:g}")
    return " ".join(parts)


@dataclass
class Entry:
    """A run, or a group of runs that differ only in their seed, with the curve it is compared by."""

    name: str
    members: list[str]
    config: dict[str, Any]
    curve: Curve
    kimg_trained: float
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        seeds = f", {len(self.members)} seeds" if len(self.members) > 1 else ""
        return f"{self.name} ({assigner_label(self.config)}{seeds})"


def _config_dict(run: Run) -> dict[str, Any]:
    try:
        config = run.config_dict()
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        raise CompareError(f"{run.config_path()}: not a config mapping; was the run made by `immiscible train`?")
    return config


def load_entries(runs: list[Run], names: list[str], *, strict: bool, err: Console) -> list[Entry]:
    """Read every run's comparable FID curve and merge seeds of one experiment into one entry (in given order)."""
    rows = {name: fid_rows(run) for name, run in zip(names, runs)}
    for name, run in zip(names, runs):
        if not rows[name]:
            raise CompareError(f"run {run.path} has no FID points in fid.jsonl; score it with "
                               f"`immiscible eval {run.path} --fid`")
    chosen = choose_fid_rows(rows, strict=strict, err=err)
    groups: dict[str, list[Entry]] = {}
    for name, run in zip(names, runs):
        metrics, config = run.metrics(), _config_dict(run)
        trained = max([r["kimg"] for r in rows[name]] + [m["kimg"] for m in metrics if _number(m.get("kimg"))])
        single = Entry(name, [name], config, curve_from_rows(chosen[name], metrics), float(trained),
                       fid_settings(chosen[name][0]))
        groups.setdefault(experiment_key(config), []).append(single)
    entries = []
    for seeds in groups.values():
        curve = seeds[0].curve if len(seeds) == 1 else mean_curve([s.curve for s in seeds])
        if curve is None:
            raise CompareError(f"runs {', '.join(s.name for s in seeds)} differ only in their seed but share no "
                               f"evaluated kimg range; evaluate them over a common range")
        entries.append(Entry(seeds[0].name, [s.name for s in seeds], seeds[0].config, curve,
                             statistics.fmean(s.kimg_trained for s in seeds), seeds[0].settings))
    return entries


# ------------------------------------------------------------------------------------------------------------------
# the comparison


def summary_row(entry: Entry, target: float, baseline: tuple[float | None, float | None],
                at_kimg: list[float]) -> dict[str, Any]:
    """One run's (or group's) line: best/final FID, FID at shared kimg, cost to the target, speed-ups.

    `baseline` is the baseline's (kimg, training seconds) to the target."""
    curve, std = entry.curve, entry.curve.fid_std
    best = min(range(len(curve.fid)), key=curve.fid.__getitem__)  # the first minimum
    kimg, seconds = cost_to_reach(curve, target)
    shared = []
    for k in at_kimg:
        fid, interpolated = value_at(curve.points(), k)
        spread = value_at(list(zip(curve.kimg, std)), k)[0] if std else None
        shared.append({"kimg": k, "fid": fid, "fid_std": spread, "interpolated": interpolated})
    return {
        "run": entry.name, "members": entry.members, "n_seeds": len(entry.members),
        "assigner": assigner_label(entry.config), "objective": (entry.config.get("objective") or {}).get("kind"),
        "batch_size": (entry.config.get("train") or {}).get("batch_size"), "kimg_trained": entry.kimg_trained,
        "best_fid": curve.fid[best], "best_fid_std": std[best] if std else None, "best_kimg": curve.kimg[best],
        "final_fid": curve.fid[-1], "final_fid_std": std[-1] if std else None, "final_kimg": curve.kimg[-1],
        "fid_at_kimg": shared, "kimg_to_target": kimg, "seconds_to_target": seconds,
        "target_at_first_point": curve.fid[0] <= target,  # then the true crossing may lie earlier: not extrapolated
        "speedup": speedup(baseline[0], kimg), "speedup_wallclock": speedup(baseline[1], seconds),
        "settings": entry.settings,
    }


def cost_to_reach(curve: Curve, target: float) -> tuple[float | None, float | None]:
    """(kimg, training seconds) at which the curve reaches the target; seconds are read at that kimg."""
    kimg = kimg_to_reach(curve.points(), target)
    seconds = value_at(curve.time_points(), kimg) if kimg is not None else None
    return kimg, seconds[0] if seconds else None


def _open_runs(paths: list[Path], baseline: Path | None) -> tuple[list[Run], int]:
    """Each run once (a repeated path counts once) and the baseline's index. A --baseline that is not among the runs
    is added in front: friendlier than refusing, and `compare A --baseline B` reads naturally."""
    runs: list[Run] = []
    for path in paths:
        run = open_run(path)
        if all(r.path.resolve() != run.path.resolve() for r in runs):
            runs.append(run)
    if baseline is None:
        return runs, 0
    base = open_run(baseline)
    found = next((i for i, r in enumerate(runs) if r.path.resolve() == base.path.resolve()), None)
    return ([base] + runs, 0) if found is None else (runs, found)


def main(runs: list[Path], *, target: float | None, baseline: Path | None, plot: Path | None,
         fmt: Literal["table", "json", "csv"], strict: bool, out: Console, err: Console) -> None:
    """Compare runs' FID curves: a table, JSON or CSV on `out`, warnings on `err`, and optionally a PNG plot.

    The baseline defaults to the first run; the target FID to the best FID of the baseline's (mean) curve."""
    if target is not None and not (math.isfinite(target) and target > 0):
        raise CompareError(f"--target must be a positive FID, got {target:g}")
    if plot is not None and (plot.suffix.lower() != ".png" or not plot.parent.is_dir()):
        raise CompareError(f"--plot {plot}: give a .png file in an existing folder")
    opened, base_index = _open_runs(list(runs), baseline)
    if len(opened) < 2:
        raise CompareError(f"compare needs at least two runs, got {len(opened)}; give another run to compare with")
    # the directory name, unless two runs share it (e.g. exp1/00001-x and exp2/00001-x)
    names = [r.name if sum(q.name == r.name for q in opened) == 1 else str(r.path) for r in opened]
    entries = load_entries(opened, names, strict=strict, err=err)
    if len(entries) < 2:
        raise CompareError(f"runs {', '.join(entries[0].members)} differ only in their seed: nothing to compare "
                           f"them with; add a run of another config")
    base = next(e for e in entries if names[base_index] in e.members)
    target_fid = target if target is not None else min(base.curve.fid)
    base_cost = cost_to_reach(base.curve, target_fid)
    if base_cost[0] is None:
        err.print(f"warning: the baseline {base.name} never reaches FID {target_fid:.2f}, so speed-ups are "
                  f"undefined; choose a larger --target", markup=False, highlight=False)
    at_kimg = shared_kimg_points([e.curve.kimg for e in entries])
    rows = [summary_row(e, target_fid, base_cost, at_kimg) for e in entries]
    if plot is not None:  # before printing: if writing fails, nothing has reached stdout yet
        write_plot(plot, [PlotLine(e.label, e.curve.kimg, e.curve.fid, e.curve.fid_std, e.curve.train_s,
                                   r["kimg_to_target"], r["seconds_to_target"]) for e, r in zip(entries, rows)],
                   target_fid, base.name)
    document = {"baseline": base.name, "target": target_fid,
                "target_source": "baseline best FID" if target is None else "--target", "runs": rows}
    if fmt == "json":
        out.file.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
    elif fmt == "csv":
        out.file.write(csv_text(document))
    else:
        print_table(document, out)
    if plot is not None:
        (out if fmt == "table" else err).print(f"plot: {plot}", markup=False, highlight=False)
