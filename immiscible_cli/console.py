"""Terminal output shared by the commands: tables at their natural width off a terminal, progress bars on one."""

from __future__ import annotations

import io
import time
from typing import Callable

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, TaskID, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table


def show_table(out: Console, table: Table) -> None:
    """Fit the table to a terminal's window; into a pipe or file, print it at its natural width, so no cell wraps
    or is cut (such output is read by programs and people with wide editors, not a window)."""
    if out.is_terminal:
        out.print(table)
        return
    natural = Measurement.get(out, out.options.update_width(10_000), table).maximum
    wide = Console(file=io.StringIO(), width=natural, color_system=None, highlight=False)
    wide.print(table)
    out.file.write(wide.file.getvalue())


Progress = Callable[[int, int, str], None]  # (done, total, what): how a long task reports itself


class Bars:
    """Rich progress bars on a terminal console; off a terminal (a log file) a plain line per bar at most every
    `PLAIN_EVERY_S` seconds and at its end, except for `keep`-ed bars (their owner logs them): the one progress
    helper of every command.

    `update(what, done, total)` makes the bar `what` on first use; a bar that is not `keep`-ed disappears when it
    reaches its total. `__call__` has the `Progress` signature, so the object is what a long task is handed."""

    PLAIN_EVERY_S = 60.0

    def __init__(self, console: Console | None, keep: tuple[str, ...] = ()):
        self.keep, self.console = keep, console
        self.live = console is not None and console.is_terminal
        self.last_line: dict[str, float] = {}
        self.bars = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console,
                                 transient=not keep) if self.live else None
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "Bars":
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bars is not None:
            self.bars.stop()

    def update(self, what: str, done: float, total: float, status: str | None = None) -> None:
        if self.bars is None:
            self._plain(what, done, total)
            return
        if what not in self.tasks:
            self.tasks[what] = self.bars.add_task(what, total=total, status=status or "")
        fields = {} if status is None else {"status": status}
        self.bars.update(self.tasks[what], completed=done, total=total, **fields)
        if done >= total and what not in self.keep:
            self.bars.remove_task(self.tasks.pop(what))

    def _plain(self, what: str, done: float, total: float) -> None:
        if self.console is None or what in self.keep:
            return
        now = time.monotonic()
        if done >= total or now - self.last_line.setdefault(what, now) >= self.PLAIN_EVERY_S:
            self.last_line[what] = now
            self.console.print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {what}: {done:g} of {total:g}", markup=False)

    def __call__(self, done: int, total: int, what: str) -> None:
        self.update(what, done, total)
