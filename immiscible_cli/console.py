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
    or is cut (such output is read by programs and people with wide editors, not a window). Cells and titles are
    printed as written, never read as rich markup: a run named `x[/]` is shown, not an error."""
    if out.is_terminal:
        Console(file=out.file, width=out.width, color_system=out.color_system, force_terminal=True, markup=False,
                highlight=False).print(table)
        return
    plain = Console(file=io.StringIO(), color_system=None, highlight=False, markup=False)
    natural = Measurement.get(plain, plain.options.update_width(10_000), table).maximum
    wide = Console(file=io.StringIO(), width=natural, color_system=None, highlight=False, markup=False)
    wide.print(table)
    out.file.write(wide.file.getvalue())


Progress = Callable[[int, int, str], None]  # (done, total, what): how a long task reports itself


def note(progress: Progress | None, message: str) -> None:
    """Say what a long phase is about to do, where the progress reporter can (Bars.note); else nothing."""
    say = getattr(progress, "note", None)
    if say is not None:
        say(message)


class Bars:
    """Rich progress bars on a terminal console; off a terminal (a log file, a pipe) plain flushed lines, except for
    `keep`-ed bars (their owner logs them): the one progress helper of every command.

    A plain line is printed for a bar every `PLAIN_EVERY_S` seconds, each time it passes another tenth of its total
    (at most one every `PLAIN_MIN_S` seconds, counted from its first update), and at its end. `note(message)` says
    what a long phase is about to do, on a terminal or not.

    `update(what, done, total)` makes the bar `what` on first use; a bar that is not `keep`-ed disappears when it
    reaches its total. `__call__` has the `Progress` signature, so the object is what a long task is handed."""

    PLAIN_EVERY_S = 30.0
    PLAIN_MIN_S = 2.0

    def __init__(self, console: Console | None, keep: tuple[str, ...] = ()):
        self.keep, self.console = keep, console
        self.live = console is not None and console.is_terminal
        self.last_line: dict[str, float] = {}
        self.last_tenth: dict[str, int] = {}
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
        since = now - self.last_line.setdefault(what, now)
        tenth = int(10 * done / total) if total > 0 else 0
        if done >= total or since >= self.PLAIN_EVERY_S or (
                tenth > self.last_tenth.setdefault(what, tenth) and since >= self.PLAIN_MIN_S):
            self.last_line[what], self.last_tenth[what] = now, tenth
            self._line(f"{what}: {done:g} of {total:g}")
        if done >= total:  # a bar of the same name may start again (the next FID point)
            self.last_line.pop(what, None)
            self.last_tenth.pop(what, None)

    def note(self, message: str) -> None:
        """One timestamped line saying what a long phase does (above the bars on a terminal), flushed."""
        if self.console is not None:
            self._line(message)

    def _line(self, text: str) -> None:
        self.console.print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text}", markup=False, highlight=False)
        self.console.file.flush()  # a redirected stdout is block-buffered: the line must reach the log now

    def __call__(self, done: int, total: int, what: str) -> None:
        self.update(what, done, total)
