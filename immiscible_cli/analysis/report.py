"""What `immiscible analyze` writes: analysis.json, tables on the terminal and one PNG per measure (one line, or
bar, per preset or run), all into the output folder, each file written atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from ..compare_runs import assigner_label
from ..console import show_table
from ..files import write_atomic

JSON_NAME = "analysis.json"
DATA_PLOTS = {"posterior_mean": "posterior of the own image (batch mean)", "accuracy": "accuracy of picking the "
              "own image", "irreducible_loss": "irreducible loss (per-dimension MSE)"}


def _number(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"


def write_json(folder: Path, payload: dict[str, Any]) -> Path:
    path = folder / JSON_NAME
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())
    return path


def _figure(width: float = 7.0, height: float = 4.5):
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no GUI, nothing left open
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
    return path


def line_plot(path: Path, title: str, xlabel: str, ylabel: str,
              series: list[tuple[str, list[float], list[Optional[float]], str]]) -> Path:
    """One line per (label, xs, ys, linestyle); None values are left out."""
    figure, axes = _figure()
    for i, (label, xs, ys, style) in enumerate(series):
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, linestyle=style, label=label, color=f"C{i % 10}")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def bar_plot(path: Path, title: str, measures: dict[str, str], rows: list[dict[str, Any]]) -> Path:
    """One panel per measure (key -> axis title), one bar per row (its `label`)."""
    figure = _figure(3.2 * len(measures), 4.0)[0]
    figure.clear()
    panels = figure.subplots(1, len(measures), squeeze=False)[0]
    labels = [row["label"] for row in rows]
    for axes, (key, name) in zip(panels, measures.items()):
        values = [row.get(key) for row in rows]
        axes.bar(range(len(rows)), [v if v is not None else 0.0 for v in values],
                 color=[f"C{i % 10}" for i in range(len(rows))])
        axes.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize="small")
        axes.set_title(name, fontsize="medium")
        axes.grid(True, axis="y", alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------------------------
# data mode


def data_tables(lines: list[dict[str, Any]], out: Console) -> None:
    per_level = Table(title="per noise level (level 0 = clean, 1 = pure noise)", title_justify="left",
                      header_style="bold")
    for column in ("line", "level", "t", "posterior", "accuracy", "irreducible loss"):
        per_level.add_column(column, justify="left" if column == "line" else "right")
    for line in lines:
        for i, row in enumerate(line["levels"]):
            per_level.add_row(line["label"] if i == 0 else "", f"{row['level']:g}", f"{row['t']:g}",
                              _number(row["posterior_mean"]), _number(row["accuracy"]),
                              _number(row["irreducible_loss"], 5), end_section=i == len(line["levels"]) - 1)
    show_table(out, per_level)
    noise = Table(title="the chosen noise", title_justify="left", header_style="bold")
    for column in ("line", "assigner", "distance reduction", "noise |n|^2/D", "miscibility", "miscibility (raw)",
                   "max |mean|", "mean variance", "KS statistic", "KS p-value"):
        noise.add_column(column, justify="left" if column in ("line", "assigner") else "right")
    for line in lines:
        gauss = line["gaussianity"]
        noise.add_row(line["label"], describe_rule(line["assigner"]), f"{100 * line['distance_reduction']:.2f}%",
                      _number(line["noise_sqnorm"]), _number(line["miscibility"], 3),
                      _number(line["miscibility_raw"], 3), _number(gauss["max_abs_mean"]),
                      _number(gauss["mean_variance"]), _number(gauss["ks_statistic"]), f"{gauss['ks_pvalue']:.3g}")
    show_table(out, noise)
    along = Table(title="the chosen noise along the data (projections on unit directions; N(0, I) gives mean 0, "
                        "variance 1)", title_justify="left", header_style="bold")
    for column in ("line", "direction", "mean (sd)", "variance", "KS statistic", "KS p-value"):
        along.add_column(column, justify="left" if column in ("line", "direction") else "right")
    for line in lines:
        rows = line["gaussianity"].get("data_directions", [])
        for i, row in enumerate(rows):
            along.add_row(line["label"] if i == 0 else "", row["direction"], _number(row["mean"]),
                          _number(row["variance"]), _number(row["ks_statistic"]), f"{row['ks_pvalue']:.3g}",
                          end_section=i == len(rows) - 1)
    show_table(out, along)
    for line in lines:
        if line["role"] == "preset" and line.get("baseline") != line["label"]:
            out.print(f"{line['label']}: baseline {line['baseline']} (vanilla pairing, image scale 1, the same "
                      f"batches)", markup=False)


def describe_rule(rule: dict[str, Any]) -> str:
    """`knn k=8`, `linear l2`, `vanilla x2` (image_scale 2) ...: compare's label of the rule (each rule's config
    section names its settings)."""
    return assigner_label({"assigner": rule})


def data_plots(lines: list[dict[str, Any]], folder: Path) -> list[Path]:
    written = []
    for key, name in DATA_PLOTS.items():
        series = [(line["label"], [r["level"] for r in line["levels"]], [r[key] for r in line["levels"]],
                   "--" if line["role"] == "baseline" else "-") for line in lines]
        written.append(line_plot(folder / f"{key}.png", name, "noise level (0 = clean, 1 = pure noise)", name,
                                 series))
    written.append(bar_plot(folder / "noise.png", "the chosen noise", {
        "distance_reduction": "image-noise distance reduction", "noise_sqnorm": "noise |n|^2 / D",
        "miscibility": "miscibility (cluster distance)"}, lines))
    return written


# ----------------------------------------------------------------------------------------------------------------
# run mode


def run_tables(results: list[dict[str, Any]], out: Console) -> None:
    losses = Table(title="loss per noise-level bin on held-out images (own assigner / vanilla noise)",
                   title_justify="left", header_style="bold")
    losses.add_column("level bin", justify="left")
    for result in results:
        losses.add_column(f"{result['label']} own", justify="right")
        losses.add_column(f"{result['label']} vanilla", justify="right")
    for k, row in enumerate(results[0]["loss_per_bin"]["bins"]):
        cells = []
        for result in results:
            bins = result["loss_per_bin"]["bins"]
            cells += [_number(bins[k]["own"], 5), _number(bins[k]["vanilla"], 5)] if k < len(bins) else ["", ""]
        losses.add_row(f"[{row['low']:g}, {row['high']:g})", *cells)
    show_table(out, losses)
    moved = Table(title="bijectivity: how far samples move when the starting noise is perturbed by W",
                  title_justify="left", header_style="bold")
    for column in ("run", "W", "pixel RMS", "pixel L2", "/ unrelated samples", "Inception L2"):
        moved.add_column(column, justify="left" if column == "run" else "right")
    for result in results:
        bij = result["bijectivity"]
        for row in [*bij["rows"], {"W": "unrelated", **bij["unrelated"], "relative": 1.0}]:
            moved.add_row(result["label"], f"{row['W']:g}" if isinstance(row["W"], float) else row["W"],
                          _number(row["pixel_rms"]), _number(row["pixel_l2"], 3), _number(row["relative"], 3),
                          _number(row["feature_l2"], 3))
    show_table(out, moved)
    near = Table(title="diversity: nearest-neighbour distance (per-pixel RMS)", title_justify="left",
                 header_style="bold")
    for column in ("run", "sample -> train", "sample -> sample", "held-out -> train", "held-out -> held-out"):
        near.add_column(column, justify="left" if column == "run" else "right")
    for result in results:
        div = result["diversity"]
        near.add_row(result["label"], *(_number(div[key]) for key in ("sample_to_train_rms", "sample_to_sample_rms",
                                                                        "heldout_to_train_rms",
                                                                        "heldout_to_heldout_rms")))
    show_table(out, near)
    for result in results:
        out.print(f"{result['label']}: held-out images: {result['held_out']}; features: "
                  f"{result['bijectivity']['features']}", markup=False)


def run_plots(results: list[dict[str, Any]], folder: Path) -> list[Path]:
    series = []
    for result in results:
        bins = result["loss_per_bin"]["bins"]
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        series += [(f"{result['label']} own", centres, [b["own"] for b in bins], "-"),
                   (f"{result['label']} vanilla", centres, [b["vanilla"] for b in bins], "--")]
    written = [line_plot(folder / "loss_per_bin.png", "loss on held-out images",
                         "noise level (bin centre; 0 = clean, 1 = pure noise)", "loss (per-dimension MSE)", series)]
    written.append(line_plot(folder / "bijectivity.png", "sample movement under a perturbed start",
                             "W (start = sqrt(1 - W^2) n + W n')", "pixel RMS distance",
                             [(r["label"], [0.0] + [row["W"] for row in r["bijectivity"]["rows"]],
                               [0.0] + [row["pixel_rms"] for row in r["bijectivity"]["rows"]], "-")
                              for r in results]))
    rows = [{"label": r["label"], **r["diversity"]} for r in results]
    written.append(bar_plot(folder / "diversity.png", "nearest-neighbour distances (per-pixel RMS)", {
        "sample_to_train_rms": "sample -> train", "sample_to_sample_rms": "sample -> sample"}, rows))
    return written
