"""Hostile names (issue 25, item 4): a run named with rich markup or matplotlib mathtext is shown as written, and a
path that is not UTF-8 is one `error:` line, exit 2."""

from __future__ import annotations

import io
import os

from compare_fakes import make_run
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from immiscible_cli.cli import app
from immiscible_cli.console import show_table

runner = CliRunner()


def test_tables_show_markup_in_names_as_written():
    table = Table(title="runs/x[/]")
    table.add_column("run")
    table.add_row("x[/]")
    table.add_row("[bold]y")
    for terminal in (False, True):
        out = Console(file=io.StringIO(), force_terminal=terminal, width=60)
        show_table(out, table)
        text = out.file.getvalue()
        assert "runs/x[/]" in text and "[bold]y" in text


def test_compare_plots_runs_named_with_mathtext(tmp_path):
    a = make_run(tmp_path, "00000-base", [(10, 90.0), (20, 60.0)])
    b = make_run(tmp_path, "00001-other", [(10, 80.0), (20, 50.0)], assigner={"name": "knn", "k": 4})
    b = b.rename(tmp_path / "00001-x$\\notacommand$")
    result = runner.invoke(app, ["compare", str(a), str(b), "--target", "70", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_a_run_dir_that_is_not_utf8_is_one_line(tmp_path):
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")
    result = runner.invoke(app, ["train", "--run-dir", bad, "--dry-run"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not valid UTF-8" in lines[0]
    assert not os.path.exists(os.fsencode(str(tmp_path)) + b"/run\xff")
    result = runner.invoke(app, ["sample", bad, "--num", "1", "--out", "x"])
    assert result.exit_code == 2 and "not valid UTF-8" in result.output
