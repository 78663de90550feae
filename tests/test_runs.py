"""The run-directory format: numbering, round trips, JSONL robustness, lookup and the lock."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from immiscible_cli import provenance, run_create, runs
from immiscible_cli.runs import append_fid_row, fid_settings, read_fid_rows
from immiscible_cli.config import load_config


def test_numbered_runs_never_collide(tmp_path):
    cfg = load_config("quickstart")
    (tmp_path / "runs" / "00007-old").mkdir(parents=True)  # a foreign numbered folder counts too
    first = run_create.create_run(tmp_path / "runs", cfg, argv=["immiscible", "train"])
    second = run_create.create_run(tmp_path / "runs", cfg)
    assert first.name == "00008-quickstart" and second.name == "00009-quickstart"
    assert run_create.next_run_path(tmp_path / "runs", "x").name == "00010-x"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_names_the_commit_and_uncommitted_edits(tmp_path):
    """meta.json's git_sha is the package checkout's HEAD; git_dirty says whether its files had edits not in it."""
    assert provenance.git_state(tmp_path) == {"git_sha": None, "git_dirty": None}  # not a checkout: unknown
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text("x = 1\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert provenance.git_state(package) == {"git_sha": head, "git_dirty": False}
    (tmp_path / "elsewhere.txt").write_text("outside the package: not counted\n")
    (package / "new.py").write_text("untracked: not counted\n")
    assert provenance.git_state(package)["git_dirty"] is False
    (package / "mod.py").write_text("x = 2\n")
    assert provenance.git_state(package) == {"git_sha": head, "git_dirty": True}


def test_round_trip(tmp_path):
    cfg = load_config("fmnist-knn", ["train.lr=1e-4"])
    run = run_create.create_run(tmp_path, cfg, argv=["immiscible", "train", "--preset", "fmnist-knn"])
    reopened = runs.open_run(run.path)
    assert reopened.config() == cfg
    meta = reopened.meta()
    assert meta["argv"][2:] == ["--preset", "fmnist-knn"]
    for key in ("immiscible_version", "torch_version", "python_version", "git_sha", "git_dirty", "device",
                "start_time"):
        assert key in meta
    assert (run.path / "checkpoints").is_dir() and (run.path / "samples").is_dir()
    run.append_metrics({"kimg": 1.0, "loss": 0.5})
    run.append_metrics({"kimg": 2.0, "loss": 0.4})
    append_fid_row(run, {"kimg": 2.0, "fid": 50.0, "mode": "clean"})
    run.log("hello")
    assert [r["loss"] for r in reopened.metrics()] == [0.5, 0.4]
    assert read_fid_rows(reopened)[0]["fid"] == 50.0
    assert reopened.log_path().read_text() == "hello\n"
    assert fid_settings({"mode": "clean", "fid": 3.0, "steps": 50})["steps"] == 50


def test_truncation_drops_rows_after_a_kimg(tmp_path):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    for kimg in (1.0, 2.0, 3.0):
        run.append_metrics({"kimg": kimg})
    append_fid_row(run, {"kimg": 3.0, "fid": 1.0})
    assert run.truncate_after(2.0) == 2
    assert [r["kimg"] for r in run.metrics()] == [1.0, 2.0] and read_fid_rows(run) == []


def test_open_and_latest_errors(tmp_path):
    with pytest.raises(runs.RunError, match="no such run directory"):
        runs.open_run(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(runs.RunError, match="not a run directory"):
        runs.open_run(tmp_path / "plain")
    with pytest.raises(runs.RunError, match="no runs found"):
        runs.latest_run(tmp_path)
    cfg = load_config("quickstart")
    run_create.create_run(tmp_path, cfg)
    newest = run_create.create_run(tmp_path, cfg)
    (tmp_path / "00099-half-made").mkdir()  # no config.yaml: not a run
    assert runs.latest_run(tmp_path).path == newest.path


def test_lock_refuses_a_second_holder(tmp_path):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    with run.lock():
        with pytest.raises(runs.RunError, match="already being trained"):
            with run.lock():
                pass
    with run.lock():  # released on exit
        pass
