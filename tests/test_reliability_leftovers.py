"""Issue 25, item 10's last findings: a continued run records what continued it (and a lost meta.json is written
again); `eval` of a read-only run that has nothing left to score is not an error; switching a preset's objective or
assigner with --set starts the new variant from its own defaults; compare warns when training speed varied several-
fold (its time speed-up then measures the machine) and never counts one seed twice in a mean curve."""

from __future__ import annotations

import json

import pytest
from compare_fakes import as_json, invoke, make_run
from conftest import TINY
from typer.testing import CliRunner

from immiscible_cli import runs, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import ConfigError, load_config

runner = CliRunner()


def test_a_continued_run_records_each_continuation_and_rewrites_a_lost_meta(tmp_path):
    cfg = load_config("quickstart", [*TINY, "train.total_kimg=0.016"])
    run = trainer.train(cfg, out_root=tmp_path, run_dir=tmp_path / "r")
    assert "continued" not in run.meta()
    longer = load_config("quickstart", [*TINY, "train.total_kimg=0.032"])
    trainer.train(longer, out_root=tmp_path, run_dir=run.path, resume=True, argv=["immiscible", "train", "again"])
    meta = run.meta()
    assert [c["argv"] for c in meta["continued"]] == [["immiscible", "train", "again"]]
    assert set(trainer.CONTINUATION_FIELDS) <= set(meta["continued"][0]) and "start_time" in meta
    (run.path / runs.META).unlink()
    trainer.train(load_config("quickstart", [*TINY, "train.total_kimg=0.048"]), out_root=tmp_path, run_dir=run.path,
                  resume=True)
    assert run.meta()["meta_rewritten"] is True and "git_sha" in run.meta()


def test_eval_of_a_read_only_run_checks_writability_only_when_a_point_is_due(tmp_path, stub_fid, monkeypatch):
    from immiscible_cli import evaluate
    from immiscible_cli.errors import EnvironmentFailure

    cfg = load_config("quickstart", [*TINY, "eval.num_images=6", "eval.steps=2", "eval.reference_images=10"])
    run = trainer.train(cfg, out_root=tmp_path, run_dir=tmp_path / "r")
    args = ["eval", str(run.path), "--fid", "--ckpt", "latest"]
    assert runner.invoke(app, args).exit_code == 0

    def refuse(*_, **__):
        raise EnvironmentFailure(f"{run.fid_path()}: read-only")

    monkeypatch.setattr(evaluate, "check_writable", refuse)  # as on a read-only file system
    assert runner.invoke(app, args).exit_code == 0  # nothing to write: the refusal does not matter
    due = runner.invoke(app, [*args, "--num-images", "7"])
    assert due.exit_code == 4 and "read-only" in due.output


def test_switching_variant_with_set_starts_from_the_new_variant_s_defaults():
    linear = load_config("cifar10-knn", ["assigner.name=linear"])  # knn's k, budget and score are dropped
    assert linear.assigner.name == "linear" and linear.assigner.cost == "l2"
    assert load_config("fmnist-knn", ["assigner.name=vanilla"]).assigner.name == "vanilla"
    with pytest.raises(ConfigError, match="sample.sampler: 'euler' does not go with objective.kind 'ddpm'"):
        load_config("cifar10-knn-fm", ["objective.kind=ddpm"])  # the real conflict, not net_time_scale
    ddpm = load_config("cifar10-knn-fm", ["objective.kind=ddpm", "sample.sampler=ddim", "eval.sampler=ddim"])
    assert ddpm.objective.kind == "ddpm"
    with pytest.raises(ConfigError, match="unknown field 'objective.net_time_scale'"):  # set by the user: refused
        load_config("cifar10-knn-fm", ["objective.kind=ddpm", "objective.net_time_scale=2"])


def test_compare_warns_when_training_speed_varied_several_fold(tmp_path):
    base = make_run(tmp_path, "00000-base", [(10, 50.0), (20, 40.0)])
    other = make_run(tmp_path, "00001-other", [(10, 45.0), (20, 35.0)], assigner={"name": "knn", "k": 4})
    quiet = invoke(base, other)
    assert quiet.exit_code == 0 and "training speed varied" not in quiet.output
    ticks = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    for tick, speed in zip(ticks, [100.0, 100.0, 20.0]):
        tick["img_per_s"] = speed
    (other / "metrics.jsonl").write_text("".join(json.dumps(t) + "\n" for t in ticks))
    busy = invoke(base, other)
    assert busy.exit_code == 0 and "training speed varied between ticks (00001-other 5.0x" in busy.output


def test_compare_never_counts_one_seed_twice_in_a_mean_curve(tmp_path):
    knn8 = {"name": "knn", "k": 8}  # a study's names: the run, then its seed
    paths = [make_run(tmp_path, f"knn8-s{seed}", [(10, fid), (20, fid - 10)], seed=seed, assigner=knn8)
             for seed, fid in [(0, 60.0), (1, 64.0)]]
    repeat = make_run(tmp_path, "knn8-kept-s0", [(10, 80.0), (20, 70.0)], seed=0, assigner=knn8)
    document = as_json(*paths, repeat)
    assert sorted(sorted(r["members"]) for r in document["runs"]) == [["knn8-kept-s0"], ["knn8-s0", "knn8-s1"]]
    numbered = [make_run(tmp_path, f"0000{i}-knn", [(10, 60.0 + i), (20, 50.0)], seed=0, assigner=knn8)
                for i in range(2)]  # names that group nothing: one entry, as before (with its warning)
    base = make_run(tmp_path, "00009-base", [(10, 70.0), (20, 55.0)])
    runs_ = as_json(base, *numbered)["runs"]
    assert sorted(sorted(r["members"]) for r in runs_) == [["00000-knn", "00001-knn"], ["00009-base"]]
