"""What training shows: a rich progress bar on a terminal (plain lines elsewhere) and the tee'd log.txt.

Every tick gives one fixed-field status line (the same text in log.txt and on the terminal), so runs can be
compared with `grep`/`awk` as well as through metrics.jsonl. The reporter also holds the run's logging backends
(loggers.py: TensorBoard, W&B; none by default): tick rows, FID rows and grids go to them, and they close with it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .config import Config
from .console import Bars
from .loggers import Logger, NullLogger, images_seen
from .runs import Run


def status_line(row: dict[str, Any]) -> str:
    """One fixed-field line per tick."""
    reduction = row.get("pair_dist_reduction")
    return (f"kimg {row['kimg']:10.3f}  step {row['step']:8d}  loss {row['loss']:.5f}  lr {row['lr']:.2e}  "
            f"img/s {row['img_per_s']:8.1f}  assign_ms {row.get('assign_ms', 0.0):7.3f}  "
            f"pair_red {100 * (reduction or 0.0):+6.2f}%  sqnorm {row.get('noise_sqnorm', 0.0):.4f}  "
            f"train_s {row['train_s']:9.1f}  mem {row['peak_mem_mib']:8.0f} MiB")


class Reporter:
    """Progress bar + log lines for one training process, and its logging backends (`logger`: rank 0's only)."""

    logger: Logger = NullLogger()  # set by `use` once the run is restored; ranks other than 0 keep this one

    def __init__(self, run: Run, cfg: Config, console: Console | None = None):
        self.run, self.cfg = run, cfg
        self.console = console or Console(highlight=False)
        self.bars = Bars(self.console, keep=("train",))  # FID points add a bar of their own while they run

    def __enter__(self) -> "Reporter":
        self.note(f"run {self.run.path}  config {self.cfg.digest()}  assigner {self.cfg.assigner.name}  "
                  f"objective {self.cfg.objective.kind}  batch {self.cfg.train.batch_size}  "
                  f"total {self.cfg.train.total_kimg:g} kimg")
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)
        self.logger.close()

    def use(self, logger: Logger) -> None:
        """Send tick rows, FID rows and grids to `logger` from now on (closed when the reporter exits)."""
        self.logger = logger

    def note(self, message: str) -> None:
        """A timestamped line in log.txt and on the console."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}"
        self.run.log(line)
        self.console.print(line, markup=False, highlight=False)

    def tick(self, row: dict[str, Any]) -> None:
        line = status_line(row)
        self.logger.scalars(row, images_seen(row["kimg"]))
        self.run.log(line)
        self.console.print(line, markup=False, highlight=False)
        self.bars.update("train", row["kimg"], self.cfg.train.total_kimg,
                         status=f"{row['kimg']:.1f} kimg  loss {row['loss']:.4f}  {row['img_per_s']:.0f} img/s")
        if not self.bars.live:
            sys.stdout.flush()

    def fid(self, row: dict[str, Any]) -> None:
        """An FID row (already in fid.jsonl) to the logging backends."""
        self.logger.fid(row)

    def image(self, path: Path, nimg: int) -> None:
        """A snapshot grid (a PNG file) at `nimg` training images to the logging backends."""
        self.logger.image(path, nimg)

    def advance(self, nimg: int) -> None:
        """Move the bar every step (host-side counter only: no device sync); no-op off a terminal."""
        self.bars.update("train", nimg / 1000, self.cfg.train.total_kimg)
