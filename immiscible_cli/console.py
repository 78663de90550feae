"""Terminal output shared by the commands that print tables (`eval`, `compare`)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.measure import Measurement
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
