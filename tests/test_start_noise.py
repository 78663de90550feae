"""The training noise's moments (accumulated, snapshotted, resumed exactly), the matched start they give
(`sample.start: matched`), the kept network (`train.keep_network`) that `sample`/`eval` load once the snapshots are
gone, and a study's `rescore` points."""

from __future__ import annotations

import shutil

import torch
import yaml
from conftest import TINY
from rich.console import Console
from typer.testing import CliRunner

from immiscible_cli import checkpoint, runs, start_noise, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.evaluate import evaluate_runs
from immiscible_cli.runs import read_fid_rows

runner = CliRunner()
FID = ["eval.num_images=6", "eval.steps=2", "eval.reference_images=10", "eval.batch_size=4"]


def train(tmp_path, extra=(), name="r", **kwargs):
    cfg = load_config("quickstart", [*TINY, *extra])
    return trainer.train(cfg, out_root=tmp_path / "runs", run_dir=tmp_path / name, **kwargs)


def last_state(run) -> dict:
    return checkpoint.load(checkpoint.list_checkpoints(run)[-1].path)


def test_moments_are_the_training_noise_s_and_resume_exactly(tmp_path):
    run = train(tmp_path, ["assigner.name=knn", "assigner.k=8"])
    saved = last_state(run)["noise_moments"]
    assert saved["count"] == 32 and saved["total"].dtype == torch.float64 and saved["total"].shape == (1, 16, 16)
    moments = start_noise.NoiseMoments.from_state(saved, (1, 16, 16), torch.device("cpu"))
    ticks = [row["noise_sqnorm"] for row in run.metrics()]  # each tick's mean |n|^2 / D, ticks of equal size
    assert abs(moments.sqnorm() - sum(ticks) / len(ticks)) < 1e-5
    assert moments.sqnorm() < 0.97  # KNN's l2 rule keeps short noise: what the matched start undoes
    # a run stopped at 0.016 kimg and resumed to 0.032 ends with the same sums, bit for bit
    half = train(tmp_path, ["assigner.name=knn", "assigner.k=8", "train.total_kimg=0.016"], name="half")
    cfg = load_config("quickstart", [*TINY, "assigner.name=knn", "assigner.k=8"])
    trainer.train(cfg, out_root=tmp_path / "runs", run_dir=half.path, resume=True)
    resumed = last_state(half)["noise_moments"]
    assert resumed["count"] == 32 and torch.equal(resumed["total"], saved["total"])
    assert torch.equal(resumed["sqtotal"], saved["sqtotal"])


def test_matched_start_is_the_gaussian_fitted_to_the_moments():
    z = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.full((10, 1, 4, 4), 0.5) + 0.1 * torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    moments = start_noise.NoiseMoments.zeros((1, 4, 4), torch.device("cpu"))
    moments.add(noise)
    mean, std = noise.double().mean(0), (noise.double().square().mean() - noise.double().mean(0).square().mean()).sqrt()
    assert torch.allclose(moments.mean(), mean) and abs(moments.std() - float(std)) < 1e-9
    got = start_noise.start(z, "matched", 0.5, moments)
    assert torch.allclose(got, mean.float() + z * float(std) * 0.5, atol=1e-6)
    assert torch.equal(start_noise.start(z, "standard", 1.0, moments), z)


def test_kept_network_samples_like_the_last_snapshot_and_serves_once_snapshots_are_gone(tmp_path):
    run = train(tmp_path, ["train.keep_network=true", "assigner.name=knn", "assigner.k=8"])
    kept = checkpoint.kept_network(run)
    assert kept is not None and kept.kimg == 0.032 and kept.path.name == "network-000000.032kimg.pt"
    args = ["--seeds", "0-3", "--set", "sample.start=matched"]
    before = runner.invoke(app, ["sample", str(run.path), "--out", str(tmp_path / "a"), *args])
    assert before.exit_code == 0, before.output
    shutil.rmtree(run.checkpoints_dir())
    after = runner.invoke(app, ["sample", str(run.path), "--out", str(tmp_path / "b"), *args])
    assert after.exit_code == 0, after.output
    for image in sorted((tmp_path / "a").glob("*.png")):
        assert image.read_bytes() == (tmp_path / "b" / image.name).read_bytes()
    raw = runner.invoke(app, ["sample", str(run.path), "--no-ema", "--seeds", "0", "--out", str(tmp_path / "c")])
    assert raw.exit_code == 2 and "EMA weights only" in raw.output and "Traceback" not in raw.output


def test_matched_start_without_moments_is_one_line(tmp_path):
    run = train(tmp_path)
    for ckpt in checkpoint.list_checkpoints(run):  # as written before the moments existed
        state = checkpoint.load(ckpt.path)
        del state["noise_moments"], state["format"]
        checkpoint.save(ckpt.path, state)
    result = runner.invoke(app, ["sample", str(run.path), "--seeds", "0", "--out", str(tmp_path / "x"),
                                 "--set", "sample.start=matched"])
    assert result.exit_code == 2, result.output
    assert "sample.start=matched" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_matched_fid_row_records_the_start_and_its_moments(tmp_path, stub_fid):
    run = train(tmp_path, FID)
    results = evaluate_runs([run], ckpts=["latest"], num_images=None, steps=None, sampler=None, reference=None,
                            mode=None, batch=None, kid=False, inception=None, device="cpu",
                            console=Console(quiet=True),
                            overrides=["sample.start=matched"])
    row = results[0]["curve"][-1]
    assert row["sampling"]["start"] == "matched" and row["start_moments"]["images"] == 32
    assert 0.9 < row["start_moments"]["std"] < 1.1  # vanilla: N(0, I) up to the estimate of 32 draws
    standard = evaluate_runs([run], ckpts=["latest"], num_images=None, steps=None, sampler=None, reference=None,
                             mode=None, batch=None, kid=False, inception=None, device="cpu",
                             console=Console(quiet=True))
    assert standard[0]["curve"][-1]["sampling"]["start"] == "standard"
    assert standard[0]["curve"][-1]["fid"] != row["fid"]


def test_a_study_rescores_finished_runs_once(tmp_path, stub_fid):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "name": "rescored", "preset": "quickstart", "set": [*TINY, *FID, "eval.every_kimg=0.016",
                                                            "train.keep_network=true"],
        "seeds": [0], "baseline": "vanilla",
        "runs": {"vanilla": {}, "knn": {"set": ["assigner.name=knn", "assigner.k=4"],
                                        "rescore": [["sample.start=matched"]]}}}))
    out = tmp_path / "out"
    assert runner.invoke(app, ["study", str(study), "--out", str(out)]).exit_code == 0
    rows = read_fid_rows(runs.open_run(out / "runs" / "knn-s0"))
    assert [r["sampling"]["start"] for r in rows] == ["standard", "standard", "matched"]
    assert [r["sampling"]["start"] for r in read_fid_rows(runs.open_run(out / "runs" / "vanilla-s0"))] == \
        ["standard", "standard"]
    again = runner.invoke(app, ["study", str(study), "--out", str(out)])
    assert again.exit_code == 0 and len(read_fid_rows(runs.open_run(out / "runs" / "knn-s0"))) == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(study.read_text().replace("sample.start=matched", "train.lr=0.5"))
    refused = runner.invoke(app, ["study", str(bad), "--out", str(out)])
    assert refused.exit_code == 2 and "rescore" in refused.output and "Traceback" not in refused.output
