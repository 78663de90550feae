"""`immiscible study`: a tiny study (2 runs x 2 seeds) runs, reports, reruns as a no-op, survives kill -9 and
continues bit-exactly, and refuses bad files with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, train_with_fid
from typer.testing import CliRunner

from immiscible_cli import checkpoint, runs
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.metrics import scorer as scorer_mod
from immiscible_cli.runs import read_fid_rows

runner = CliRunner()
FID = ["eval.every_kimg=0.016", "eval.num_images=6", "eval.steps=2", "eval.reference_images=10",
       "eval.batch_size=4"]


def write_study(path: Path, extra: list[str], name: str = "tiny") -> Path:
    path.write_text(yaml.safe_dump({
        "name": name, "preset": "quickstart", "set": TINY + extra, "seeds": [0, 1], "baseline": "vanilla",
        "runs": {"vanilla": {}, "knn": {"set": ["assigner.name=knn", "assigner.k=4"]}}}))
    return path


def test_tiny_study_runs_reports_and_reruns_as_a_no_op(tmp_path, stub_fid):
    study = write_study(tmp_path / "tiny.yaml", FID)
    out = tmp_path / "study"
    dry = runner.invoke(app, ["study", str(study), "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "4 of 4 runs to do" in dry.output and not out.exists()
    first = runner.invoke(app, ["study", str(study), "--out", str(out)])
    assert first.exit_code == 0, first.output
    for name in ("vanilla-s0", "knn-s0", "vanilla-s1", "knn-s1"):
        run = runs.open_run(out / "runs" / name)
        assert [r["kimg"] for r in read_fid_rows(run)] == [0.016, 0.032]
        assert run.config().seed == int(name[-1]) and run.config().name == name.split("-")[0]
    for name in ("report.md", "comparison.txt", "comparison.json", "curves.png", "study.yaml"):
        assert (out / name).is_file(), name
    assert "knn" in (out / "comparison.txt").read_text()
    starts = (out / "study.log").read_text().count("start ")
    assert starts == 4
    again = runner.invoke(app, ["study", str(study), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "study.log").read_text().count("start ") == starts  # nothing trained twice
    dry = runner.invoke(app, ["study", str(study), "--out", str(out), "--dry-run"])
    assert "0 of 4 runs to do" in dry.output and "time left about" in dry.output


def test_study_killed_with_sigkill_continues_bit_exactly(tmp_path):
    longer = ["train.total_kimg=0.24", "train.snapshot_kimg=0.04", "train.tick_kimg=0.04"]
    study = write_study(tmp_path / "tiny.yaml", longer)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "immiscible_cli", "study", str(study), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the threads of the in-process run
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    first_run = out / "runs" / "vanilla-s0"
    deadline = time.time() + 600  # generous: a loaded machine starts the subprocess slowly
    while (time.time() < deadline and process.poll() is None
           and len(checkpoint.list_checkpoints(runs.Run(first_run))) < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = checkpoint.list_checkpoints(runs.Run(first_run))
    assert process.returncode == -signal.SIGKILL and kept and kept[-1].kimg < 0.24  # killed mid-run
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert "start vanilla seed 0 at" in (out / "study.log").read_text()
    # the interrupted run ends exactly where an uninterrupted one does
    whole = train_with_fid(load_config("quickstart", TINY + longer + ["name=vanilla", "seed=0"]),
                           out_root=tmp_path / "whole")
    a = checkpoint.load(checkpoint.list_checkpoints(whole)[-1].path)["ema"]
    b = checkpoint.load(checkpoint.list_checkpoints(runs.Run(first_run))[-1].path)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("batch, points, resumed_with", [
    (8, [0.016, 0.032], []), (6, [0.018, 0.036], []),  # 6 does not divide 16
    (8, [0.016, 0.032], ["eval.steps=3"]),  # the point no longer shares the grid: the grid is drawn apart
])
def test_an_fid_point_lost_in_a_crash_is_scored_on_resume(tmp_path, stub_fid, monkeypatch, batch, points,
                                                          resumed_with):
    cfg = load_config("quickstart", TINY + FID + [f"train.batch_size={batch}"])
    real = scorer_mod.FIDScorer.score
    calls = []

    def dies_on_second(self, *args, **kwargs):
        calls.append(kwargs["kimg"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while scoring the point at 0.032 kimg
        return real(self, *args, **kwargs)
    monkeypatch.setattr(scorer_mod.FIDScorer, "score", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_with_fid(cfg, out_root=tmp_path, run_dir=tmp_path / "r")
    run = runs.open_run(tmp_path / "r")
    assert [r["kimg"] for r in read_fid_rows(run)] == points[:1]
    assert checkpoint.list_checkpoints(run)[-1].kimg == points[1]  # the snapshot came before the FID point
    # the point draws the snapshot's grid (its first images are the grid): lost with it, and drawn on resume
    assert run.grid_path(points[0]).is_file() and not run.grid_path(points[1]).exists()
    monkeypatch.setattr(scorer_mod.FIDScorer, "score", real)
    train_with_fid(load_config("quickstart", TINY + FID + [f"train.batch_size={batch}", *resumed_with]),
                   out_root=tmp_path, run_dir=tmp_path / "r", resume=bool(resumed_with))
    assert [r["kimg"] for r in read_fid_rows(run)] == points
    assert all(run.grid_path(kimg).is_file() for kimg in points)


@pytest.mark.parametrize("change, message", [
    ({"baseline": "nope"}, "baseline: 'nope' is not one of the runs"),
    ({"runs": {"vanilla": {"sett": []}, "knn": {}}}, "runs.vanilla.sett"),
    ({"runs": {"vanilla": {"set": ["train.lr=-1"]}, "knn": {}}}, "train.lr"),
    ({"seeds": []}, "seeds"),
    ({"preset": "no-such-preset"}, "no-such-preset"),
])
def test_bad_study_files_fail_with_one_line(tmp_path, change, message):
    raw = {"name": "x", "preset": "quickstart", "seeds": [0], "baseline": "vanilla",
           "runs": {"vanilla": {}, "knn": {"set": ["assigner.name=knn"]}}, **change}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["study", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_report_only_on_a_partial_study_compares_what_has_fid_points(tmp_path, stub_fid):
    study = write_study(tmp_path / "tiny.yaml", FID)
    out = tmp_path / "partial"
    early = runner.invoke(app, ["study", str(study), "--out", str(out), "--report-only"])
    assert early.exit_code == 0, early.output  # nothing trained yet: a report that says so, no traceback
    assert "no comparison" in (out / "comparison.txt").read_text()
    train_with_fid(load_config("quickstart", TINY + FID + ["name=vanilla", "seed=0"]), out_root=out,
                   run_dir=out / "runs" / "vanilla-s0")
    train_with_fid(load_config("quickstart", TINY + FID + ["name=knn", "seed=0", "assigner.name=knn",
                                                           "assigner.k=4"]), out_root=out, run_dir=out / "runs" / "knn-s0")
    result = runner.invoke(app, ["study", str(study), "--out", str(out), "--report-only"])
    assert result.exit_code == 0, result.output
    table = (out / "comparison.txt").read_text()
    assert "vanilla-s0" in table and "knn-s0" in table and "-s1" not in table


def test_a_study_edited_to_train_longer_continues_its_runs_and_refuses_other_changes(tmp_path):
    study = write_study(tmp_path / "tiny.yaml", [])
    out = tmp_path / "grow"
    assert runner.invoke(app, ["study", str(study), "--out", str(out)]).exit_code == 0
    run = runs.open_run(out / "runs" / "knn-s1")
    assert checkpoint.list_checkpoints(run)[-1].kimg == 0.032
    write_study(study, ["train.total_kimg=0.048"])  # TINY's 0.032 overridden: one more snapshot each
    longer = runner.invoke(app, ["study", str(study), "--out", str(out)])
    assert longer.exit_code == 0, longer.output
    assert checkpoint.list_checkpoints(run)[-1].kimg == 0.048 and run.config().train.total_kimg == 0.048
    write_study(study, ["train.total_kimg=0.048", "train.lr=0.5"])
    refused = runner.invoke(app, ["study", str(study), "--out", str(out)])
    assert refused.exit_code == 2 and "train.lr" in refused.output and "Traceback" not in refused.output
