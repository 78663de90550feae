"""The two-panel PNG figure of `immiscible compare`: FID against training images and against training time.

compare.py computes the rows (one dict per run or seed group, the same dicts the JSON output holds) and hands each
run's or group's curve here as a `PlotLine`, so the plot shows the numbers of the table, the CSV and the JSON (those
are formatted by compare_table.py). A seed group is drawn as its mean curve with a ± std band and, thin and faint,
each seed's own curve.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from .files import write_atomic


@dataclass
class PlotLine:
    """One run or seed group as drawn: its curve, the std band (groups) and where it reaches the target."""

    label: str
    kimg: list[float]
    fid: list[float]
    fid_std: list[float] | None
    train_s: list[float | None]
    kimg_to_target: float | None
    seconds_to_target: float | None
    seeds: list[tuple[list[float], list[float]]] = field(default_factory=list)  # each seed's (kimg, fid), groups


def _time_unit(longest_s: float) -> tuple[str, float]:
    """A unit that keeps the time axis readable: (name, seconds per unit)."""
    if longest_s >= 2 * 3600:
        return "hours", 3600.0
    return ("minutes", 60.0) if longest_s >= 120 else ("seconds", 1.0)


def write_plot(path: Path, lines: list[PlotLine], target: float, baseline: str) -> None:
    """FID vs kimg (log y) and FID vs training time, the target as a dashed line, crossings marked; written as PNG
    atomically (a reader never sees half a file)."""
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no GUI, nothing left open
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(13, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    by_kimg, by_time = figure.subplots(1, 2)
    unit, seconds_per_unit = _time_unit(max((s for ln in lines for s in ln.train_s if s is not None), default=0))
    for i, line in enumerate(lines):
        color = f"C{i % 10}"
        std = line.fid_std or [0.0] * len(line.fid)
        timed = [(s / seconds_per_unit, f, d) for s, f, d in zip(line.train_s, line.fid, std) if s is not None]
        panels = [(by_kimg, list(zip(line.kimg, line.fid, std)), line.kimg_to_target, 1.0),
                  (by_time, timed, line.seconds_to_target, seconds_per_unit)]
        for kimg, fid in line.seeds:  # thin and faint under the mean curve
            by_kimg.plot(kimg, fid, color=color, linewidth=0.7, alpha=0.45)
        for axes, points, crossing, scale in panels:
            if not points:
                continue  # no training seconds recorded: this run is missing from the time panel only
            xs, fids, spread = zip(*points)
            axes.plot(xs, fids, color=color, marker="o", markersize=3, linewidth=1.5,
                      label=line.label.replace("$", r"\$"))  # a run name is text, not mathtext
            if line.fid_std:  # log axis: keep the band's lower edge positive
                axes.fill_between(xs, [max(f - d, f * 0.05) for f, d in zip(fids, spread)],
                                  [f + d for f, d in zip(fids, spread)], color=color, alpha=0.2, linewidth=0)
            if crossing is not None:
                axes.plot([crossing / scale], [target], color=color, marker="X", markersize=10,
                          markeredgecolor="black", linestyle="none")
    for axes, xlabel in ((by_kimg, "training images (kimg)"),
                         (by_time, f"training time ({unit}, FID time excluded)")):
        axes.axhline(target, color="0.35", linestyle="--", linewidth=1, label=f"target FID {target:.2f}")
        axes.set_yscale("log")
        for axis_format in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
            axis_format(FuncFormatter(lambda value, _: f"{value:g}"))  # 20, 30, 40 rather than 2 x 10^1
        axes.set_xlabel(xlabel)
        axes.set_ylabel("FID (log scale)")
        axes.grid(True, which="both", alpha=0.3)
    by_kimg.legend(fontsize="small")
    by_kimg.set_title("FID vs training images (X: target reached)")
    by_time.set_title("FID vs wall-clock training time")
    figure.suptitle(f"speed-up measured at FID {target:.2f} against {baseline.replace('$', chr(92) + '$')}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
