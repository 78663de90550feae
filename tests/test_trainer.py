"""The training loop end to end on tiny CPU runs: run directory, golden losses, exact resume, fallbacks, NaN, lock."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import train_with_fid

from immiscible_cli import checkpoint, run_create, runs, train_loop, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.errors import UserError
from immiscible_cli.runs import read_fid_rows

runner = CliRunner()


def train_cli(*args: str):
    return runner.invoke(app, ["train", *args])


def only_run(root) -> runs.Run:
    (path,) = [p for p in root.iterdir() if p.is_dir()]
    return runs.open_run(path)


def test_tiny_run_writes_the_whole_run_directory(tmp_path, tiny, stub_fid):
    result = train_cli("--out", str(tmp_path / "runs"), *sum((["--set", s] for s in tiny), []),
                       "--set", "eval.every_kimg=0.016", "--set", "eval.num_images=6", "--set", "eval.steps=2",
                       "--set", "eval.reference_images=10", "--set", "eval.batch_size=4")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "runs")
    assert run.name == "00000-quickstart"
    for name in ("config.yaml", "meta.json", "log.txt", "metrics.jsonl", "fid.jsonl"):
        assert (run.path / name).is_file(), name
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [0.016, 0.032]
    assert sorted(p.name for p in (run.path / "samples").iterdir()) == ["grid-000000.016kimg.png",
                                                                         "grid-000000.032kimg.png"]
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == [2, 4]
    for key in ("kimg", "loss", "lr", "img_per_s", "assign_ms", "pair_dist", "pair_dist_reduction",
                "noise_sqnorm", "train_s", "peak_mem_mib"):
        assert key in metrics[0], key
    curve = read_fid_rows(run)
    assert [row["kimg"] for row in curve] == [0.016, 0.032]
    row = curve[0]
    assert row["num_images"] == 6 and row["mode"] == "clean" and row["sampler"] == "euler"
    assert row["reference"]["num_images"] == 10 and row["weights"]["source"] == "stub"
    assert row["fid"] > 0 and row["seconds"] > 0 and row["train_s"] > 0
    log = run.log_path().read_text()
    assert log.count("kimg ") >= 2 and "snapshot" in log and "FID" in log
    assert "run directory" in result.output


# Golden values: mean loss of the first two ticks (two steps each) of the tiny flow-matching run (seed 0). They
# change only when the model, objective, data order or RNG use changes; regenerate on purpose by printing
# [m["loss"] for m in run.metrics()]. Tolerance: 1e-5 relative (CPU float32 across BLAS builds).
# Regenerated when the random streams were split by purpose (common random numbers).
GOLDEN_LOSSES = [1.624896764755249, 1.523681879043579]


def test_first_losses_match_golden_values(tmp_path, tiny):
    run = trainer.train(load_config("quickstart", tiny), out_root=tmp_path)
    losses = [m["loss"] for m in run.metrics()]
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-5)


def final_parameters(run: runs.Run) -> dict[str, torch.Tensor]:
    state = checkpoint.load(checkpoint.list_checkpoints(run)[-1].path)
    return {**{f"net.{k}": v for k, v in state["net"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


@pytest.mark.parametrize("preset, extra", [("quickstart-knn", []),
                                           ("fmnist-linear", ["data.source=embedded", "train.ema_decay=0.9"])])
def test_resume_is_bit_identical(tmp_path, tiny, preset, extra):
    cfg = load_config(preset, tiny + extra)
    whole = trainer.train(cfg, out_root=tmp_path / "whole")
    half_cfg = load_config(preset, tiny + extra + ["train.total_kimg=0.016"])
    half = trainer.train(half_cfg, out_root=tmp_path / "half")
    longer = trainer.train(cfg, out_root=tmp_path, run_dir=half.path, resume=True)
    assert [c.kimg for c in checkpoint.list_checkpoints(longer)] == [0.016, 0.032]
    a, b = final_parameters(whole), final_parameters(longer)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in whole.metrics()] == [m["loss"] for m in longer.metrics()]


def test_rerunning_into_the_same_run_dir_continues_after_a_crash(tmp_path, tiny):
    cfg = load_config("quickstart", tiny)
    whole = trainer.train(cfg, out_root=tmp_path / "whole")
    crashed = trainer.train(cfg, out_root=tmp_path, run_dir=tmp_path / "crash")
    checkpoint.list_checkpoints(crashed)[-1].path.unlink()  # as if the process died after the first snapshot
    again = trainer.train(cfg, out_root=tmp_path, run_dir=tmp_path / "crash")
    assert [m["step"] for m in again.metrics()] == [2, 4]  # the rows after the snapshot were written once more
    a, b = final_parameters(whole), final_parameters(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_config("quickstart", tiny + ["seed=5"])
    with pytest.raises(UserError, match="another config"):
        trainer.train(other, out_root=tmp_path, run_dir=tmp_path / "crash")


def test_corrupt_newest_checkpoint_falls_back(tmp_path, tiny):
    cfg = load_config("quickstart", tiny)
    run = trainer.train(cfg, out_root=tmp_path)
    newest = checkpoint.list_checkpoints(run)[-1].path
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    result = train_cli("--resume", str(run.path), "--set", "train.total_kimg=0.048")
    assert result.exit_code == 0, result.output
    assert "skipping" in result.output and "unreadable" in result.output
    assert "resumed from snapshot-000000.016kimg.pt" in result.output
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [0.016, 0.032, 0.048]
    assert runs.open_run(run.path).config().train.total_kimg == 0.048


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny, monkeypatch):
    real_step = trainer.TrainingLoop.train_step

    def poisoned(self):
        if self.step == 2:  # the third step: its parameters turn NaN
            for p in self.net.parameters():
                p.data.fill_(float("nan"))
        real_step(self)

    monkeypatch.setattr(trainer.TrainingLoop, "train_step", poisoned)
    result = train_cli("--out", str(tmp_path / "runs"), *sum((["--set", s] for s in tiny), []))
    assert result.exit_code == 3
    assert "not finite at step 3" in result.output and "snapshot-000000.016kimg.pt" in result.output
    run = only_run(tmp_path / "runs")
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [0.016]
    assert torch.isfinite(checkpoint.load(checkpoint.list_checkpoints(run)[0].path)["net"]["conv_in.weight"]).all()


def test_second_trainer_on_one_run_dir_is_refused(tmp_path, tiny):
    cfg = load_config("quickstart", tiny)
    run = trainer.train(cfg, out_root=tmp_path, run_dir=tmp_path / "busy")
    with run.lock():
        result = train_cli("--resume", str(run.path))
    assert result.exit_code == 2 and "already being trained" in result.output


def test_resume_refuses_changes_to_the_training_math(tmp_path, tiny):
    run = trainer.train(load_config("quickstart", tiny), out_root=tmp_path)
    before = (run.path / "config.yaml").read_text()
    result = train_cli("--resume", str(run.path), "--set", "train.lr=0.5")
    assert result.exit_code == 2 and "cannot change" in result.output
    assert (run.path / "config.yaml").read_text() == before


def test_class_conditional_training_and_guided_sampling(tmp_path, tiny):
    cfg = load_config("quickstart", tiny + ["model.num_classes=10", "train.label_dropout=0.5",
                                            "sample.guidance=2.0"])
    run = trainer.train(cfg, out_root=tmp_path)
    result = runner.invoke(app, ["sample", str(run.path), "--num", "3", "--class", "4", "--guidance", "3",
                                 "--grid", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g.png").stat().st_size > 0
    result = runner.invoke(app, ["sample", str(run.path), "--num", "3", "--class", "10", "--grid", "x.png"])
    assert result.exit_code == 2 and "expected 0..9" in result.output


@pytest.mark.parametrize("assigner", [["assigner.name=knn", "assigner.k=4"],
                                      ["assigner.name=linear", "assigner.quantize=fp16", "assigner.image_scale=2"],
                                      ["assigner.name=vanilla", "assigner.image_scale=4"]])
def test_every_rule_trains_through_the_cli_with_its_diagnostics(tmp_path, tiny, assigner):
    sets = sum((["--set", s] for s in tiny + assigner), [])
    result = train_cli("--out", str(tmp_path), *sets)
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path)
    lines = [ln for ln in run.log_path().read_text().splitlines() if ln.startswith("kimg")]
    assert len(lines) == 2 and len({len(ln.split()) for ln in lines}) == 1  # fixed-field status lines
    rows = [json.loads(ln) for ln in (run.path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["assign_ms"] > 0 and row["pair_dist"] > 0
    if "assigner.name=vanilla" in assigner:
        assert all(row["pair_dist_reduction"] == 0 for row in rows)
    else:  # both rules bring the chosen noise nearer than a random pairing of the same batch
        assert all(row["pair_dist_reduction"] > 0 for row in rows)


def test_fid_points_fall_on_multiples_only_and_short_runs_skip_fid(tmp_path, tiny, stub_fid, monkeypatch):
    fid = ["eval.num_images=4", "eval.steps=2", "eval.reference_images=8", "eval.batch_size=4"]
    run = train_with_fid(load_config("quickstart", tiny + fid + ["eval.every_kimg=0.024"]), out_root=tmp_path / "a")
    assert [r["kimg"] for r in read_fid_rows(run)] == [0.024]  # not forced at the end (0.032)
    assert [m["kimg"] for m in run.metrics()] == [0.016, 0.024, 0.032]  # every stop is a tick

    from immiscible_cli.metrics import scorer

    def no_scorer(*args, **kwargs):
        raise AssertionError("a run with no FID point must not load FID weights or reference statistics")

    monkeypatch.setattr(scorer, "FIDScorer", no_scorer)
    short = train_with_fid(load_config("quickstart", tiny + fid + ["eval.every_kimg=1"]), out_root=tmp_path / "b")
    assert read_fid_rows(short) == [] and len(checkpoint.list_checkpoints(short)) == 2


def test_an_fid_point_at_a_snapshot_draws_the_grid_from_its_own_images(tmp_path, tiny, stub_fid, monkeypatch):
    """The grid's images (seeds 0..grid_size-1, the same sampler and steps) are the FID point's first images: they
    are sampled once, and the grid matches the one drawn separately (in other batches: 3 + 1 against 4) to within
    a grey level."""
    import numpy as np
    from PIL import Image

    from immiscible_cli.metrics import scorer

    fid = ["eval.every_kimg=0.016", "eval.num_images=6", "eval.steps=2", "eval.reference_images=10",
           "eval.batch_size=3"]
    cfg = load_config("quickstart", tiny + fid)
    grids = []
    real_generate = train_loop.generate

    def counting_generate(*args, **kwargs):
        grids.append(kwargs.get("steps"))
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(train_loop, "generate", counting_generate)
    shared = train_with_fid(cfg, out_root=tmp_path / "shared")
    assert grids == []  # both snapshots fall on FID points: no separate grid sampling
    monkeypatch.setattr(scorer.FIDScorer, "shares_grid", lambda self, sample: False)
    separate = train_with_fid(cfg, out_root=tmp_path / "separate")
    assert grids == [2, 2]
    assert read_fid_rows(shared)[-1]["fid"] == read_fid_rows(separate)[-1]["fid"]
    for kimg in (0.016, 0.032):
        a, b = (np.asarray(Image.open(run.grid_path(kimg)), dtype=np.int16) for run in (shared, separate))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
    monkeypatch.undo()


@pytest.mark.parametrize("extra, world, shared", [
    ([], 1, True), (["eval.steps=3"], 1, False), (["eval.sampler=heun"], 1, False), (["sample.grid_size=8"], 1, False),
    (["eval.precision=bf16"], 1, False), (["sample.sampler=dopri5", "eval.sampler=dopri5"], 1, False), ([], 2, False),
])
def test_when_the_grid_is_an_fid_points_first_images(tiny, stub_fid, monkeypatch, extra, world, shared):
    from immiscible_cli import distributed
    from immiscible_cli.metrics import scorer

    fid = ["eval.every_kimg=0.016", "eval.num_images=6", "eval.steps=2", "eval.reference_images=10"]
    cfg = load_config("quickstart", tiny + fid + extra)
    made = scorer.FIDScorer(cfg, torch.device("cpu"))
    monkeypatch.setattr(distributed, "world", lambda: world)
    assert made.shares_grid(cfg.sample) is shared


def _recorded_draws(monkeypatch, cfg, root):
    """Train `cfg` and record every batch's images, timesteps and flips as the loss sees them."""
    from immiscible_cli.objectives.flow import Flow

    seen = {"x0": [], "t": []}
    real_loss = Flow.loss

    def recording_loss(self, net, data, noise, t, /, labels=None):
        seen["x0"].append(data.clone())
        seen["t"].append(t.clone())
        return real_loss(self, net, data, noise, t, labels=labels)
    monkeypatch.setattr(Flow, "loss", recording_loss)
    trainer.train(cfg, out_root=root)
    monkeypatch.setattr(Flow, "loss", real_loss)
    return seen


def test_common_random_numbers_same_images_and_timesteps_whatever_the_assigner(tmp_path, tiny, monkeypatch):
    """Same seed, different assigners (KNN draws k times more noise): the images (order and flips) and the
    timesteps are identical step by step; only the noise differs. Another seed changes them."""
    vanilla = _recorded_draws(monkeypatch, load_config("quickstart", tiny), tmp_path / "a")
    knn = _recorded_draws(monkeypatch, load_config("quickstart-knn", tiny), tmp_path / "b")
    linear = _recorded_draws(monkeypatch, load_config("quickstart", tiny + ["assigner.name=linear"]), tmp_path / "c")
    other = _recorded_draws(monkeypatch, load_config("quickstart", tiny + ["seed=1"]), tmp_path / "d")
    assert len(vanilla["t"]) == 4
    for run in (knn, linear):
        assert all(torch.equal(a, b) for a, b in zip(vanilla["x0"], run["x0"]))
        assert all(torch.equal(a, b) for a, b in zip(vanilla["t"], run["t"]))
    assert not torch.equal(vanilla["t"][0], other["t"][0])
    assert not torch.equal(vanilla["x0"][0], other["x0"][0])


def test_ema_warmup_follows_tqch(tmp_path, tiny):
    from immiscible_cli.data import load_images

    cfg = load_config("quickstart", tiny + ["train.ema_halflife_kimg=null", "train.ema_decay=0.9999",
                                            "train.ema_warmup=true"])
    run = run_create.create_run(tmp_path, cfg)
    loop = trainer.TrainingLoop(cfg, run, load_images(cfg.data), torch.device("cpu"))
    assert loop.ema_decay_at(1) == pytest.approx(2 / 11)
    assert loop.ema_decay_at(100) == pytest.approx(101 / 110)
    assert loop.ema_decay_at(10**6) == 0.9999  # capped by the decay
    before = {k: v.clone() for k, v in loop.ema.state_dict().items()}
    loop.train_step()  # first update: ema = 2/11 ema + 9/11 net
    after, net = loop.ema.state_dict(), loop.net.state_dict()
    key = "conv_in.weight"
    torch.testing.assert_close(after[key], 2 / 11 * before[key] + 9 / 11 * net[key])
    loop.ema_warmup = False
    assert loop.ema_decay_at(1) == 0.9999
