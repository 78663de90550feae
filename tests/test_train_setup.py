"""train_setup: the one preparation of a training run that `train` and `study` share (config and run directory,
create or continue, checks before work, the scorer), seen at its seams; no training here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY
from immiscible_cli import run_create, runs, train_setup
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.errors import UserError


def test_plan_creates_continues_or_refuses(tmp_path: Path) -> None:
    fresh = train_setup.plan("quickstart", TINY, out_dir=tmp_path / "runs")
    assert not fresh.continues and fresh.target == tmp_path / "runs" / "00000-quickstart"
    made = run_create.create_run_at(tmp_path / "held", load_config("quickstart", TINY))
    assert train_setup.plan("quickstart", TINY, out_dir=tmp_path, run_dir=made.path).continues
    resumed = train_setup.plan(None, ["train.total_kimg=1"], out_dir=tmp_path, resume=made.path)
    assert resumed.continues and resumed.target == made.path and resumed.cfg.train.total_kimg == 1
    with pytest.raises(UserError, match="drop --preset/--run-dir"):
        train_setup.plan("quickstart", None, out_dir=tmp_path, resume=made.path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(runs.RunError, match="not empty and not a run of ours"):
        train_setup.plan("quickstart", TINY, out_dir=tmp_path, run_dir=tmp_path / "foreign")


def test_train_and_study_both_go_through_train_run(tmp_path: Path, monkeypatch) -> None:
    from immiscible_cli import study

    calls = []

    def fake(cfg, *, out_dir, run_dir=None, resume=False, **_):
        calls.append((cfg.name, run_dir, resume))
        return run_create.create_run_at(Path(run_dir or out_dir / "made"), cfg)

    monkeypatch.setattr(train_setup, "train_run", fake)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--out", "runs", *[a for s in TINY for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    assert calls == [("quickstart", None, False)]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "s", "preset": "quickstart", "set": TINY, "seeds": [0], "baseline": "vanilla",
        "runs": {"vanilla": {}, "knn": {"set": ["assigner.name=knn", "assigner.k=4"]}}}))
    spec = study.load_study(tmp_path / "s.yaml")
    monkeypatch.setattr(study, "write_report", lambda *a, **k: tmp_path / "report.md")
    study.run_study(spec, tmp_path / "s.yaml", tmp_path / "out", console=None)
    trained = [call[1:] for call in calls[1:]]  # the members status found unfinished, each in its own folder
    assert trained and all(path.parent == tmp_path / "out" / "runs" and not resume for path, resume in trained)
    assert (tmp_path / "out" / "runs" / "knn-s0", False) in trained
