"""`immiscible eval`: settings-aware, idempotent and resumable scoring of checkpoints, JSON output."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, StubNetwork, train_with_fid
from rich.console import Console
from typer.testing import CliRunner

from immiscible_cli import evaluate
from immiscible_cli.cli import app
from immiscible_cli.compare_rows import choose_fid_rows
from immiscible_cli.config import load_config
from immiscible_cli.metrics import FIDExtractor, WeightsInfo
from immiscible_cli.runs import FID_SETTINGS, read_fid_rows

runner = CliRunner()
FID_SET = ["eval.every_kimg=0.016", "eval.num_images=6", "eval.steps=2", "eval.reference_images=10",
           "eval.batch_size=4"]


@pytest.fixture
def run_with_curve(tmp_path, stub_fid):
    """A tiny run whose trainer already scored both snapshots."""
    return train_with_fid(load_config("quickstart", TINY + FID_SET), out_root=tmp_path / "runs")


def eval_cli(*args: str):
    return runner.invoke(app, ["eval", *args])


def test_eval_after_training_adds_nothing(run_with_curve):
    before = read_fid_rows(run_with_curve)
    result = eval_cli(str(run_with_curve.path), "--fid")
    assert result.exit_code == 0, result.output
    assert "2 already scored" in result.output and "0 to score" in result.output
    assert read_fid_rows(run_with_curve) == before


def test_new_settings_score_every_checkpoint_once(run_with_curve):
    first = eval_cli(str(run_with_curve.path), "--fid", "--steps", "3", "--ckpt", "latest")
    assert first.exit_code == 0, first.output
    assert len(read_fid_rows(run_with_curve)) == 3
    again = eval_cli(str(run_with_curve.path), "--fid", "--steps", "3")  # all: only the older one is new
    assert again.exit_code == 0, again.output
    rows = [r for r in read_fid_rows(run_with_curve) if r["steps"] == 3]
    assert sorted(r["kimg"] for r in rows) == [0.016, 0.032]
    assert eval_cli(str(run_with_curve.path), "--fid", "--steps", "3").exit_code == 0
    assert len(read_fid_rows(run_with_curve)) == 4  # idempotent


def test_interrupted_eval_resumes_without_duplicates(run_with_curve, monkeypatch):
    real = evaluate.FIDScorer.score
    calls = {"n": 0}

    def dies_on_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(evaluate.FIDScorer, "score", dies_on_second)
    interrupted = eval_cli(str(run_with_curve.path), "--fid", "--num-images", "4")
    assert interrupted.exit_code != 0
    assert len([r for r in read_fid_rows(run_with_curve) if r["num_images"] == 4]) == 1
    monkeypatch.setattr(evaluate.FIDScorer, "score", real)
    resumed = eval_cli(str(run_with_curve.path), "--fid", "--num-images", "4")
    assert resumed.exit_code == 0, resumed.output
    rows = [r for r in read_fid_rows(run_with_curve) if r["num_images"] == 4]
    assert sorted(r["kimg"] for r in rows) == [0.016, 0.032]


def test_json_output_schema(run_with_curve):
    result = eval_cli(str(run_with_curve.path), "--fid", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    (entry,) = document["runs"]
    assert entry["run"] == str(run_with_curve.path)
    assert [p["kimg"] for p in entry["curve"]] == [0.016, 0.032]
    for point in entry["curve"]:
        for key in ("kimg", "step", "fid", "num_images", "mode", "reference", "sampler", "steps", "guidance",
                    "weights", "seconds", "train_s"):
            assert key in point, key
        assert set(point["weights"]) == {"source", "sha256", "dtype"}


def test_no_run_means_the_newest_under_runs(run_with_curve, monkeypatch):
    monkeypatch.chdir(run_with_curve.path.parent.parent)
    result = eval_cli("--fid")
    assert result.exit_code == 0, result.output
    assert run_with_curve.name in result.output


def test_kid_is_stored_beside_fid(run_with_curve):
    result = eval_cli(str(run_with_curve.path), "--fid", "--kid", "--ckpt", "latest")
    assert result.exit_code == 0, result.output
    rows = [r for r in read_fid_rows(run_with_curve) if "kid" in r]
    assert len(rows) == 1 and rows[0]["kimg"] == 0.032


def test_eval_set_scores_beside_the_runs_own_points(run_with_curve):
    """`eval --set sample.start_std=0.5` adds a row that records the setting, beside the trainer's rows (which it
    neither replaces nor re-scores); a second call adds nothing; compare still reads the run's own curve."""
    before = read_fid_rows(run_with_curve)
    first = eval_cli(str(run_with_curve.path), "--fid", "--ckpt", "latest", "--set", "sample.start_std=0.5")
    assert first.exit_code == 0, first.output
    assert "0 already scored" in first.output and "1 to score" in first.output
    rows = read_fid_rows(run_with_curve)
    assert rows[:len(before)] == before and len(rows) == len(before) + 1
    new = rows[-1]
    assert new["kimg"] == 0.032 and new["sampling"]["start_std"] == 0.5
    assert all(r["sampling"]["start_std"] == 1.0 for r in before)
    assert new["fid"] != next(r["fid"] for r in before if r["kimg"] == 0.032)
    again = eval_cli(str(run_with_curve.path), "--fid", "--ckpt", "latest", "--set", "sample.start_std=0.5")
    assert again.exit_code == 0 and "1 already scored" in again.output
    assert len(read_fid_rows(run_with_curve)) == len(rows)
    chosen = choose_fid_rows({"run": read_fid_rows(run_with_curve)}, strict=True, err=Console())
    assert chosen["run"] == before  # compare's choice: the combination with the most points


@pytest.mark.parametrize("args, needle", [
    (["--fid", "--set", "train.lr=1"], "'train.lr' cannot change when sampling a trained run"),
    (["--fid", "--set", "sample.start_std=-1"], "sample.start_std"),
    ([], "choose a metric"),
    (["--fid", "--sampler", "ddim"], "accepted: euler, heun"),
    (["--fid", "--reference", "cleanfid"], "CIFAR-10"),
    (["--fid", "--ckpt", "99"], "no snapshot at 99"),
])
def test_eval_errors_are_clean(run_with_curve, args, needle):
    result = eval_cli(str(run_with_curve.path), *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_eval_with_no_runs_anywhere(tmp_path):
    result = eval_cli("--fid", "--root", str(tmp_path))
    assert result.exit_code == 2 and "no runs found" in result.output


def test_fid_settings_cover_the_comparability_fields(run_with_curve):
    row = read_fid_rows(run_with_curve)[0]
    assert set(FID_SETTINGS) <= set(row)


def test_eval_runs_inception_at_the_runs_precision(tmp_path, stub_fid, monkeypatch):
    """eval.inception_precision applies to `immiscible eval` as to the trainer's FID points (CUDA is simulated:
    the CPU always runs fp32), and the rows record the precision the network ran at."""
    run = train_with_fid(load_config("quickstart", TINY + FID_SET + ["eval.inception_precision=fp16"]),
                         out_root=tmp_path / "runs")
    assert {r["inception_precision"] for r in read_fid_rows(run)} == {"fp32"}  # trained on the CPU
    built = []

    def make(mode="clean", device="cpu", weights=None, batch_size=64, precision="fp32", **_):
        built.append(precision)
        return FIDExtractor(mode, device, batch_size=batch_size, network=StubNetwork(), precision=precision,
                            info=WeightsInfo("stub", "", "0" * 64, "float32"))

    monkeypatch.setattr(evaluate, "FIDExtractor", make)
    monkeypatch.setattr(evaluate, "inception_precision", lambda wanted, device: wanted)  # as on CUDA
    result = eval_cli(str(run.path), "--fid")
    assert result.exit_code == 0, result.output
    assert built == ["fp16"]
    rows = read_fid_rows(run)
    assert sorted(r["kimg"] for r in rows if r["inception_precision"] == "fp16") == [0.016, 0.032]
