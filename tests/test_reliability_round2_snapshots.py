"""Snapshot fields beyond the weights (issue 25, item 1): a newest snapshot whose counts, data position, optimizer
state or random states are malformed is skipped by `train --resume` (which says why and resumes from the one
before) and named, with the field, in one line by `sample` and `eval`."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import TINY, only_error
from typer.testing import CliRunner

from immiscible_cli import checkpoint, checkpoint_format, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.networks import expected_snapshot
from immiscible_cli.runs import Run

runner = CliRunner()



@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return trainer.train(load_config("quickstart", TINY), out_root=tmp_path_factory.mktemp("runs"))


def _set(state, path, value):
    node = state
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value


# (what is damaged, the path to it, the value written there, the field the error names)
DAMAGE = [
    ("data position text", ("data", "position"), "x", "data"),
    ("data without epoch", ("data", "epoch"), KeyError, "data"),
    ("step as text", ("step",), "3", "step"),
    ("kimg NaN", ("kimg",), math.nan, "kimg"),
    ("world_size 0", ("world_size",), 0, "world_size"),
    ("no optimizer groups", ("optimizer", "param_groups"), [], "optimizer"),
    ("an optimizer moment of the wrong shape", ("optimizer", "state", 0, "exp_avg"), torch.zeros(3), "optimizer"),
    ("a stream state cut short", ("rng", "noise"), torch.zeros(10, dtype=torch.uint8), "rng.noise"),
    ("the torch state as floats", ("rng", "torch"), torch.zeros(5056), "rng.torch"),
    ("rng.cuda not a list", ("rng", "cuda"), 7, "rng.cuda"),
]


@pytest.fixture(params=DAMAGE, ids=[d[0] for d in DAMAGE])
def damaged(request, trained_run, tmp_path):
    _, path, value, field = request.param
    run = shutil.copytree(trained_run.path, tmp_path / "run")
    newest = checkpoint.list_checkpoints(Run(run))[-1].path
    state = torch.load(newest, weights_only=True)
    _set(state, path, value)
    torch.save(state, newest)
    return run, newest, field


def test_the_field_is_named_by_the_loader(damaged):
    run, newest, field = damaged
    expected = expected_snapshot(Run(run).config())
    problems = checkpoint_format.mismatches(torch.load(newest, weights_only=True), expected)
    assert problems and problems[0].startswith(field), problems
    loaded = checkpoint.load_newest(Run(run), "cpu", expected)  # resume's choice: the snapshot before it
    assert loaded.checkpoint.path != newest and field in loaded.skipped[0]


def test_sample_names_the_snapshot_and_the_field(damaged):
    run, newest, field = damaged
    result = runner.invoke(app, ["sample", str(run), "--num", "1", "--out", "imgs"])
    line = only_error(result)
    assert result.exit_code == 2 and newest.name in line and field in line and "usable checkpoints" in line


def test_resume_falls_back_to_the_snapshot_before_and_says_why(trained_run, tmp_path):
    run = shutil.copytree(trained_run.path, tmp_path / "run")
    older, newest = [c.path for c in checkpoint.list_checkpoints(Run(run))[-2:]]
    state = torch.load(newest, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(state, newest)
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and newest.name in result.output and "optimizer" in result.output


def test_an_untouched_snapshot_has_no_field_problems(trained_run):
    expected = expected_snapshot(trained_run.config())
    for ckpt in checkpoint.list_checkpoints(trained_run):
        assert checkpoint_format.field_problems(torch.load(ckpt.path, weights_only=True), expected) == []


def test_every_temporary_file_a_killed_write_left_is_removed_under_the_lock(trained_run, tmp_path):
    run = Run(shutil.copytree(trained_run.path, tmp_path / "run"))
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    left = [run.path / ".config.yaml.tmp-123", run.path / ".meta.json.tmp-9", run.path / ".fid.jsonl.tmp-4",
            run.path / "checkpoints" / ".snapshot-000000.048kimg.pt.tmp-77", run.path / "samples" / ".grid.png.tmp-5"]
    for path in left:
        path.write_bytes(b"half")
    (run.path / ".link.tmp-8").symlink_to(outside)
    assert checkpoint.remove_leftovers(run) == sorted(left)
    assert not any(path.exists() for path in left)
    assert (run.path / ".link.tmp-8").is_symlink() and outside.read_text() == "keep"
    assert (run.path / "config.yaml").is_file() and checkpoint.list_checkpoints(run)
