"""The committed studies (docs/results/fashion-mnist/ and its 120-kimg extension in long/) are reproducible from
their committed files: every finished run has what the results page cites, and `immiscible compare` on the committed
run folders prints the committed comparison, number for number. No training; it reads the committed fid.jsonl and
metrics.jsonl only."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from immiscible_cli import study as study_mod
from immiscible_cli.cli import app

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# Each committed study: its output folder, the study file in studies/ it was run from, and the least number of
# finished runs it holds (what its results page cites).
STUDIES = {"fmnist-cpu": (RESULTS / "fashion-mnist", "fmnist-cpu.yaml", 10),
           "fmnist-cpu-long": (RESULTS / "fashion-mnist" / "long", "fmnist-cpu-long.yaml", 0)}


def committed(path: Path) -> bool:
    """Whether the run's fid.jsonl is committed: git's word in a checkout (a study in progress leaves unfinished
    runs in the working tree, never in a commit), the file's presence elsewhere (a clean clone, an archive)."""
    try:
        found = subprocess.run(["git", "ls-files", "--error-unmatch", str(path / "fid.jsonl")], cwd=path.parent,
                               capture_output=True)
    except FileNotFoundError:
        return (path / "fid.jsonl").is_file()
    return found.returncode == 0 if found.returncode in (0, 1) else (path / "fid.jsonl").is_file()


def members(name: str) -> tuple[Path, study_mod.Study, list[dict], list[dict]]:
    """A committed study's folder, its study file, every member's status and the finished (committed) ones."""
    out = STUDIES[name][0]
    study = study_mod.load_study(out / "study.yaml")
    rows = study_mod.status(study, out)
    return out, study, rows, [r for r in rows if committed(Path(r["path"]))]


FINISHED = [(name, row) for name in STUDIES for row in members(name)[3]]


@pytest.mark.parametrize("name", STUDIES)
def test_the_study_file_committed_with_the_results_is_the_one_in_studies(name):
    out, source, _ = STUDIES[name]
    assert (out / "study.yaml").read_bytes() == (RESULTS.parent.parent / "studies" / source).read_bytes()


@pytest.mark.parametrize("name,row", FINISHED, ids=[f"{n}:{r['run']}-s{r['seed']}" for n, r in FINISHED])
def test_every_run_of_the_study_is_committed_finished(name, row):
    path = Path(row["path"])
    for file in ("config.yaml", "meta.json", "metrics.jsonl", "fid.jsonl", "log.txt"):
        assert (path / file).is_file(), f"{path / file} is not committed"
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


@pytest.mark.parametrize("name", STUDIES)
def test_compare_on_the_committed_runs_prints_the_committed_comparison(name):
    out, study, _, finished = members(name)
    if len(finished) < 2:  # the baseline and one other run at least: until then no comparison is committed
        assert not (out / "comparison.json").exists(), f"{out}: a comparison committed before two runs finished"
        return
    committed_json = json.loads((out / "comparison.json").read_text())
    paths = [r["path"] for r in finished]
    baseline = next(r["path"] for r in finished if r["run"] == study.baseline)
    target = [] if study.target is None else ["--target", str(study.target)]
    result = CliRunner().invoke(app, ["compare", *paths, "--baseline", baseline, "--strict", "--json", *target])
    assert result.exit_code == 0, result.output
    assert _rounded(json.loads(result.stdout)) == _rounded(committed_json)
    # and the text table of the report is what the study's own writer makes of the same files today
    table = (out / "comparison.txt").read_text()
    assert study_mod.comparison(study, out, rows=finished)[0] == table


@pytest.mark.parametrize("name", STUDIES)
def test_the_report_names_every_member_and_what_is_still_to_run(name):
    out, _, rows, finished = members(name)
    if len(finished) < 2:
        return  # nothing reported yet: the comparison test checks that no report numbers were committed
    report = (out / "report.md").read_text()
    for row in rows:
        assert f"| {row['run']} | {row['seed']} |" in report
    assert len(finished) >= STUDIES[name][2]  # e.g. part 1's ten runs at least
