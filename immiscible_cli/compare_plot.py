"""How a comparison is shown: the rich table, the CSV text and the two-panel PNG figure of `immiscible compare`.

compare.py computes the rows (one dict per run or seed group, the same dicts the JSON output holds); this module only
formats them, so the numbers in the table, the CSV, the JSON and the plot are the same numbers.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .console import show_table
from .files import write_atomic


# ------------------------------------------------------------------------------------------------------------------
# the table and the CSV


def _kimg_text(kimg: float) -> str:
    return f"{kimg:,.0f}" if kimg >= 100 else f"{kimg:.3g}"


def _fid_text(fid: float, std: float | None = None, interpolated: bool = False) -> str:
    return f"{fid:.2f}" + (f" ± {std:.2f}" if std is not None else "") + ("*" if interpolated else "")


def _speedup_text(row: dict[str, Any], key: str) -> str:
    if row["kimg_to_target"] is None:
        return "not reached"
    return "n/a" if row[key] is None else f"{row[key]:.2f}x"  # n/a: the baseline never reached it, or no train_s


def print_table(document: dict[str, Any], out: Console) -> None:
    """The comparison as a rich table on `out`, with footnotes saying how to read it."""
    rows, target = document["runs"], document["target"]
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
    for header in ["run", "assigner", "objective", "batch", "n", "kimg", "best FID @ kimg", "final FID",
                   *(f"FID @ {_kimg_text(p['kimg'])} kimg" for p in rows[0]["fid_at_kimg"]),
                   f"kimg to FID {target:.2f}", "speed-up", "speed-up (time)"]:
        table.add_column(header, justify="left" if header in ("run", "assigner", "objective") else "right")
    for row in rows:
        cells = [row["run"], row["assigner"], str(row["objective"]), str(row["batch_size"]), str(row["n_seeds"]),
                 _kimg_text(row["kimg_trained"]),
                 f"{_fid_text(row['best_fid'], row['best_fid_std'])} @ {_kimg_text(row['best_kimg'])}",
                 _fid_text(row["final_fid"], row["final_fid_std"]),
                 *(_fid_text(p["fid"], p["fid_std"], p["interpolated"]) for p in row["fid_at_kimg"]),
                 "not reached" if row["kimg_to_target"] is None
                 else _kimg_text(row["kimg_to_target"]) + ("†" if row["target_at_first_point"] else ""),
                 _speedup_text(row, "speedup"), _speedup_text(row, "speedup_wallclock")]
        table.add_row(*(Text(cell) for cell in cells))  # Text: run names are never read as rich markup
    show_table(out, table)
    source = "the baseline's best FID" if document["target_source"] != "--target" else "--target"
    notes = [f"target FID {target:.2f} ({source}); baseline {document['baseline']}; speed-up = baseline kimg to the "
             f"target / this run's kimg, interpolated between FID points, never extrapolated; time = training "
             f"seconds, FID time excluded"]
    if any(p["interpolated"] for row in rows for p in row["fid_at_kimg"]):
        notes.append("* interpolated between the run's two nearest FID points")
    if any(row["target_at_first_point"] for row in rows):
        notes.append("† already at or below the target at its first FID point: it may have got there earlier "
                     "(nothing is extrapolated)")
    if any(row["n_seeds"] > 1 for row in rows):
        notes.append("n > 1: runs that differ only in their seed; mean ± std over seeds, speed-up from the mean "
                     "curve")
    for note in notes:
        out.print(note, markup=False, highlight=False)


def csv_text(document: dict[str, Any]) -> str:
    """The table as CSV: one header line, one line per run or seed group, plain numbers (empty = none)."""
    rows = document["runs"]
    shared = [f"fid_at_{p['kimg']:g}kimg" for p in rows[0]["fid_at_kimg"]]
    header = ["run", "assigner", "objective", "batch_size", "n_seeds", "kimg_trained", "best_fid", "best_fid_std",
              "best_kimg", "final_fid", "final_fid_std", *shared, "target_fid", "kimg_to_target",
              "seconds_to_target", "speedup", "speedup_wallclock"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = {**row, **{name: p["fid"] for name, p in zip(shared, row["fid_at_kimg"])},
                  "target_fid": document["target"]}
        writer.writerow([values[key] for key in header])
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------------------
# the figure


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
        for axes, points, crossing, scale in panels:
            if not points:
                continue  # no training seconds recorded: this run is missing from the time panel only
            xs, fids, spread = zip(*points)
            axes.plot(xs, fids, color=color, marker="o", markersize=3, linewidth=1.5, label=line.label)
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
    figure.suptitle(f"speed-up measured at FID {target:.2f} against {baseline}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
