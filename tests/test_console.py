"""Progress off a terminal: plain timestamped lines, at most one per interval and one at the end of each bar."""

from __future__ import annotations

import io

from rich.console import Console

from immiscible_cli.console import Bars


def test_bars_write_plain_lines_to_a_log(monkeypatch):
    log = Console(file=io.StringIO(), color_system=None)
    bars = Bars(log, keep=("train",))
    with bars:
        for done in range(0, 11):
            bars(done, 10, "reference statistics")
            bars.update("train", done, 10)
    lines = log.file.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("reference statistics: 10 of 10")  # the end, nothing between
    monkeypatch.setattr(Bars, "PLAIN_EVERY_S", 0.0)
    every = Console(file=io.StringIO(), color_system=None)
    quick = Bars(every)
    for done in (1, 2, 3):
        quick(done, 3, "FID")
    assert [line.split("  ")[-1] for line in every.file.getvalue().splitlines()] == ["FID: 1 of 3", "FID: 2 of 3",
                                                                                    "FID: 3 of 3"]
    Bars(None)(1, 3, "FID")  # no console: silent, no error
