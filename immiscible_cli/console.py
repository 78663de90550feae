"""Terminal output shared by the commands: tables at their natural width off a terminal, progress bars on one."""

from __future__ import annotations

import io
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
    """Rich progress bars on a terminal console, nothing elsewhere: the one progress helper of every command.

    `update(what, done, total)` makes the bar `what` on first use; a bar that is not `keep`-ed disappears when it
    reaches its total. `update` itself has the `Progress` signature, so it is what a long task is handed."""

    def __init__(self, console: Console | None, keep: tuple[str, ...] = ()):
        self.keep = keep
        self.live = console is not None and console.is_terminal
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
            return
        if what not in self.tasks:
            self.tasks[what] = self.bars.add_task(what, total=total, status=status or "")
        fields = {} if status is None else {"status": status}
        self.bars.update(self.tasks[what], completed=done, total=total, **fields)
        if done >= total and what not in self.keep:
            self.bars.remove_task(self.tasks.pop(what))

    def __call__(self, done: int, total: int, what: str) -> None:
        self.update(what, done, total)
