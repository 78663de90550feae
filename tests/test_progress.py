"""Long phases say what they do off a terminal: `immiscible train` into a pipe prints (and flushes) what the
reference statistics and each FID point are doing, and how far they are, as plain timestamped lines."""

from __future__ import annotations

import io
import re
import time

from conftest import TINY
from rich.console import Console
from typer.testing import CliRunner

from immiscible_cli.cli import app
from immiscible_cli import console
from immiscible_cli.console import Bars


def test_train_into_a_pipe_reports_reference_statistics_and_fid_points(tmp_path, stub_fid, monkeypatch):
    monkeypatch.setattr(Bars, "PLAIN_MIN_S", 0.0)  # every tenth passed gets its line (normally 2 s apart at most)
    sets = TINY + ["eval.every_kimg=0.016", "eval.num_images=4", "eval.reference_images=8", "eval.batch_size=4",
                   "eval.steps=1"]
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "runs"),
                                      *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "
    wanted = [r"FID reference: reading the embedded images \(train split\)",
              r"reference statistics: 8 \S+ train images through the Inception network \(clean\), once, cached as "
              r"\S+\.npz",
              r"reference statistics: 4 of 8", r"reference statistics: 8 of 8",
              r"FID at 0\.016 kimg: generating 4 images \(euler, 1 steps\) and scoring them", r"FID: 4 of 4"]
    found = [next((i for i, line in enumerate(lines) if re.search(stamp + pattern + "$", line)), None)
             for pattern in wanted]
    assert None not in found, (wanted[found.index(None)], result.output)
    assert found == sorted(found)  # in the order the phases happen, reference statistics before the run starts
    run_line = next(i for i, line in enumerate(lines) if " run " in line and "config" in line)
    assert found[3] < run_line < found[4]


def test_plain_lines_every_tenth_at_most_every_few_seconds(monkeypatch):
    clock = iter(float(t) for t in range(100))

    class FakeTime:  # replaces the console module's `time` only: one second passes per update
        monotonic = staticmethod(lambda: next(clock))
        strftime = staticmethod(time.strftime)

    monkeypatch.setattr(console, "time", FakeTime)
    log = Console(file=io.StringIO(), color_system=None)
    bars = Bars(log)
    for done in range(0, 101):  # one update per (fake) second
        if done <= 40:
            bars(done, 100, "FID")
    assert bars.PLAIN_MIN_S == 2.0 and bars.PLAIN_EVERY_S == 30.0
    shown = [int(line.split("FID: ")[1].split(" ")[0]) for line in log.file.getvalue().splitlines()]
    assert shown == [10, 20, 30, 40]  # each tenth, as soon as 2 s have passed since the last line
    bars.note("doing a long thing")
    assert log.file.getvalue().splitlines()[-1].endswith("  doing a long thing")
