"""What training shows: a rich progress bar on a terminal (plain lines elsewhere) and the tee'd log.txt.

Every tick gives one fixed-field status line (the same text in log.txt and on the terminal), so runs can be
compared with `grep`/`awk` as well as through metrics.jsonl.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from .config import Config
from .runs import Run


def status_line(row: dict[str, Any]) -> str:
    """One fixed-field line per tick."""
    reduction = row.get("pair_dist_reduction")
    return (f"kimg {row['kimg']:10.3f}  step {row['step']:8d}  loss {row['loss']:.5f}  lr {row['lr']:.2e}  "
            f"img/s {row['img_per_s']:8.1f}  assign_ms {row.get('assign_ms', 0.0):7.3f}  "
            f"pair_red {100 * (reduction or 0.0):+6.2f}%  sqnorm {row.get('noise_sqnorm', 0.0):.4f}  "
            f"train_s {row['train_s']:9.1f}  mem {row['peak_mem_mib']:8.0f} MiB")


class Reporter:
    """Progress bar + log lines for one training process."""

    def __init__(self, run: Run, cfg: Config, console: Console | None = None):
        self.run, self.cfg = run, cfg
        self.console = console or Console(highlight=False)
        self.progress: Progress | None = None
        self.task = None
        self.sub_task = None

    def __enter__(self) -> "Reporter":
        self.note(f"run {self.run.path}  config {self.cfg.digest()}  assigner {self.cfg.assigner.name}  "
                  f"objective {self.cfg.objective.kind}  batch {self.cfg.train.batch_size}  "
                  f"total {self.cfg.train.total_kimg:g} kimg")
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.cfg.train.total_kimg, status="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def note(self, message: str) -> None:
        """A timestamped line in log.txt and on the console."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}"
        self.run.log(line)
        self.console.print(line, markup=False, highlight=False)

    def tick(self, row: dict[str, Any]) -> None:
        line = status_line(row)
        self.run.log(line)
        self.console.print(line, markup=False, highlight=False)
        if self.progress is not None:
            self.progress.update(self.task, completed=row["kimg"],
                                 status=f"{row['kimg']:.1f} kimg  loss {row['loss']:.4f}  {row['img_per_s']:.0f} img/s")
        else:
            sys.stdout.flush()

    def advance(self, nimg: int) -> None:
        """Move the bar every step (host-side counter only: no device sync); no-op off a terminal."""
        if self.progress is not None:
            self.progress.update(self.task, completed=nimg / 1000)

    def sub_progress(self, done: int, total: int, what: str = "FID") -> None:
        """Progress of a sub-task (FID sampling and scoring): a second bar on a terminal, nothing elsewhere."""
        if self.progress is None:
            return
        if self.sub_task is None:
            self.sub_task = self.progress.add_task(what, total=total, status=what)
        self.progress.update(self.sub_task, completed=done, total=total)
        if done >= total:
            self.progress.remove_task(self.sub_task)
            self.sub_task = None
