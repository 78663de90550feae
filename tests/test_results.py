"""The committed Fashion-MNIST study (docs/results/fashion-mnist/) is reproducible from its committed files: every
run has what the results page cites, and `immiscible compare` on the committed run folders prints the committed
comparison, number for number. No training; it reads the committed fid.jsonl and metrics.jsonl only."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from immiscible_cli import study as study_mod
from immiscible_cli.cli import app

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "fashion-mnist"
STUDY = study_mod.load_study(OUT / "study.yaml")


def committed(path: Path) -> bool:
    """Whether the run's fid.jsonl is committed: git's word in a checkout (a study in progress leaves unfinished
    runs in the working tree, never in a commit), the file's presence elsewhere (a clean clone, an archive)."""
    try:
        found = subprocess.run(["git", "ls-files", "--error-unmatch", str(path / "fid.jsonl")], cwd=OUT,
                               capture_output=True)
    except FileNotFoundError:
        return (path / "fid.jsonl").is_file()
    return found.returncode == 0 if found.returncode in (0, 1) else (path / "fid.jsonl").is_file()


MEMBERS = study_mod.status(STUDY, OUT)
RUNS = [r for r in MEMBERS if committed(Path(r["path"]))]  # the study's finished runs; the rest are still to run


def test_the_study_file_committed_with_the_results_is_the_one_in_studies():
    assert (OUT / "study.yaml").read_bytes() == (OUT.parents[2] / "studies" / "fmnist-cpu.yaml").read_bytes()


@pytest.mark.parametrize("row", RUNS, ids=[f"{r['run']}-s{r['seed']}" for r in RUNS])
def test_every_run_of_the_study_is_committed_finished(row):
    path = Path(row["path"])
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "fid.jsonl", "log.txt"):
        assert (path / name).is_file(), f"{path / name} is not committed"
    assert row["done"], f"{path}: {row['kimg']} of {row['total_kimg']} kimg, {row['fid_points']} FID points"
    assert row["fid_points"] == row["fid_due"] >= 5  # what the study asks of a run
    fid_rows = [json.loads(line) for line in (path / "fid.jsonl").read_text().splitlines()]
    assert all(r["num_images"] >= 2000 for r in fid_rows)  # the least: 2,000 images a point, against
    assert {r["reference"]["num_images"] for r in fid_rows} == {60000}  # the statistics of all 60k training images
    grid = path / "samples" / f"grid-{row['kimg']:010.3f}kimg.png"  # the last grid, shown by the results page
    assert grid.is_file(), f"{grid} is not committed (samples/ is ignored: git add -f)"


def _rounded(value):
    """JSON numbers to 9 significant digits: the comparison, not the last bit of a float sum."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def test_compare_on_the_committed_runs_prints_the_committed_comparison():
    committed = json.loads((OUT / "comparison.json").read_text())
    paths = [r["path"] for r in RUNS]
    baseline = next(r["path"] for r in RUNS if r["run"] == STUDY.baseline)
    target = [] if STUDY.target is None else ["--target", str(STUDY.target)]
    result = CliRunner().invoke(app, ["compare", *paths, "--baseline", baseline, "--strict", "--json", *target])
    assert result.exit_code == 0, result.output
    assert _rounded(json.loads(result.stdout)) == _rounded(committed)
    # and the text table of the report is what the study's own writer makes of the same files today
    table = (OUT / "comparison.txt").read_text()
    assert study_mod.comparison(STUDY, OUT, rows=RUNS)[0] == table


def test_the_report_names_every_member_and_what_is_still_to_run():
    report = (OUT / "report.md").read_text()
    for row in MEMBERS:
        assert f"| {row['run']} | {row['seed']} |" in report
    assert len(RUNS) >= 10  # part 1's ten runs at least
