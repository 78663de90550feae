"""`immiscible analyze`: the measurements behind the papers' argument, for a user's own data, rule or run.

Data mode (data_mode.py: on batches, no training; posterior.py the batch-posterior math; levels.py the noise-level
axis both modes share) and run mode (run_mode.py: a trained run's network). report.py writes analysis.json, the
terminal tables and the PNG plots. `analyze_presets` and `analyze_runs` are the command's one library call each.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..config import Config, check_steps
from ..console import Bars
from ..errors import UserError
from ..files import check_writable
from ..images import save_png
from ..runs import Run
from . import report
from .data_mode import DataSettings, analyze_presets as measure_presets
from .run_mode import GRID_SEEDS, RunSettings, analyze_run

NAME_CHARS = 80  # a default folder name longer than this names the first line and how many more


def default_out(names: list[str], parent: Path = Path("analysis")) -> Path:
    """analysis/NAME (several: NAME-vs-NAME..., or FIRST-and-N-more when that is long)."""
    name = "-vs-".join(names)
    return parent / (name if len(name) <= NAME_CHARS else f"{names[0]}-and-{len(names) - 1}-more")


def _labels(names: list[str]) -> list[str]:
    """Names made distinct: a repeated name gets #2, #3, ..."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


def analyze_presets(configs: list[Config], settings: DataSettings, out: Path | None,
                    console: Console) -> Path:
    """Data mode for these resolved presets: analysis.json, tables on `console`, plots; returns the folder."""
    folder = out or default_out([c.name for c in configs])
    check_writable(folder, "folder", "--out")
    labelled = list(zip(_labels([c.name for c in configs]), configs))
    with Bars(console) as bars:
        lines = measure_presets(labelled, settings, progress=bars)
    payload = {"mode": "data", "settings": {**asdict(settings), "levels": list(settings.levels)}, "lines": lines}
    folder.mkdir(parents=True, exist_ok=True)
    report.write_json(folder, payload)
    report.data_tables(lines, console)
    report.data_plots(lines, folder)
    return folder


def _grid_rows(images: torch.Tensor, columns: int) -> np.ndarray:
    """uint8 [R * columns, C, H, W] -> one [R H, columns W, C] array: row r holds images r * columns ... ."""
    n, c, h, w = images.shape
    rows = n // columns
    return images.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c).numpy()


def analyze_runs(runs: list[Run], settings: RunSettings, out: Path | None, console: Console) -> Path:
    """Run mode for these runs: analysis.json, tables, plots and a bijectivity image per run; returns the folder
    (default: analysis/NAME beside the first run)."""
    if settings.samples < 2:
        raise UserError(f"--samples {settings.samples}: at least 2 samples are needed (distances between them)")
    folder = out or default_out([r.name for r in runs], runs[0].path.resolve().parent / "analysis")
    check_writable(folder, "folder", "--out")
    for run in runs:
        if settings.steps is not None:
            check_steps(run.config(), settings.steps)
        if run.config().data.source == "latents":
            raise UserError(f"{run.path}: trains on VAE latents; run mode measures image runs (data mode "
                            f"takes a latents preset: --preset)")
    results = []
    labels = _labels([r.name for r in runs])
    with Bars(console) as bars:
        for label, run in zip(labels, runs):
            result, grid = analyze_run(run, settings, progress=bars)
            result["label"] = label
            results.append(result)
            folder.mkdir(parents=True, exist_ok=True)
            save_png(_grid_rows(grid, min(GRID_SEEDS, settings.samples)), folder / f"bijectivity-{label}.png")
    payload = {"mode": "run", "settings": {**asdict(settings), "inception": str(settings.inception or "")},
               "runs": results}
    report.write_json(folder, payload)
    report.run_tables(results, console)
    report.run_plots(results, folder)
    return folder


__all__ = ["DataSettings", "RunSettings", "analyze_presets", "analyze_runs", "default_out"]
