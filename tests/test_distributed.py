"""Several processes on the CPU (gloo, 2 ranks): DDP takes the steps of one process, the sharded pairing rules,
distributed FID, bit-exact resume, a resume on another number of processes, bad input, a failure on one rank.

One spawn of 2 processes runs the library's scenarios (dist_workers.py); two launches go through the command line:
torchrun itself, and ranks started by hand (no torchrun agent) where one fails. Tiny runs (conftest.TINY)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dist_workers
from conftest import TINY
from dist_workers import EVAL, KNN, NO_DROPOUT, PAIRINGS, pairing_batch, sets

from immiscible_cli import assigners, checkpoint, distributed, runs, train_ranks
from immiscible_cli.assigners import linear
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.errors import UserError
from immiscible_cli.runs import read_fid_rows

pytestmark = pytest.mark.slow
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    tests = str(Path(__file__).parent)
    return {**env, "IMMISCIBLE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")])), **extra}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """(root, [rank 0's results, rank 1's]) of dist_workers.two_ranks."""
    root = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(dist_workers.two_ranks, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The same tiny runs in one process (dropout off): `knn` and `vanilla`."""
    root = tmp_path_factory.mktemp("alone")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMMISCIBLE_CACHE", str(root / "cache"))
        return {"knn": dist_workers.train(TINY + NO_DROPOUT + KNN, root / "knn", "quickstart-knn"),
                "vanilla": dist_workers.train(TINY + NO_DROPOUT, root / "vanilla")}


def final_state(run: runs.Run | str | Path) -> dict[str, torch.Tensor]:
    run = run if isinstance(run, runs.Run) else runs.open_run(run)
    state = checkpoint.load(checkpoint.list_checkpoints(run)[-1].path)
    return {**{f"net.{k}": v for k, v in state["net"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def assert_same_steps(a, b) -> None:
    """Same parameters up to the order gradients are summed in (DDP over 2 ranks, or micro-batches)."""
    a, b = final_state(a), final_state(b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)


# ------------------------------------------------------------------------------------------------------------------
# training


def test_two_processes_take_the_steps_of_one(ranks, alone):
    _, (r0, r1) = ranks
    assert r0["knn"] == r1["knn"]  # every rank knows rank 0's run directory
    run = runs.open_run(r0["knn"])
    assert_same_steps(run, alone["knn"])
    losses = [m["loss"] for m in run.metrics()]
    assert losses == pytest.approx([m["loss"] for m in alone["knn"].metrics()], rel=1e-5)  # the mean over ranks
    assert all(m["world_size"] == 2 and m["pair_dist_reduction"] > 0 for m in run.metrics())
    meta = run.meta()
    assert meta["world_size"] == 2 and meta["assign_scope"] == "per-image"
    log = run.log_path().read_text()
    assert log.count("snapshot snapshot-000000.032kimg.pt") == 1 and "2 process(es) x 4 images" in log


def test_micro_batches_accumulate_to_the_same_step(ranks, alone):
    _, (r0, _) = ranks
    assert_same_steps(r0["accumulate"], alone["vanilla"])  # 2 ranks x 2 passes of 2 images = 1 process x 8


@pytest.mark.filterwarnings("ignore:knn. memory_budget_mib")  # knn_chunked is below its minimum, on purpose
def test_sharded_pairing_is_the_one_process_pairing(ranks):
    _, (r0, r1) = ranks
    batch = pairing_batch()
    for name in PAIRINGS:
        cfg = dist_workers.assigner(name)
        both = torch.cat([r0["pairing"][name], r1["pairing"][name]])
        if name == "linear_local":  # each shard against its own rows of the global vanilla draw
            draw = torch.randn(batch.shape, generator=torch.Generator().manual_seed(7))
            for rank, got in enumerate((r0["pairing"][name], r1["pairing"][name])):
                rows = slice(4 * rank, 4 * rank + 4)
                cost, _, _ = linear.cost_matrix(batch[rows].flatten(1), draw[rows].flatten(1), "l2", "none")
                assert torch.equal(got, draw[rows][torch.from_numpy(linear.solve(cost))]), rank
            assert not torch.equal(both, assigners.pair(batch, cfg, torch.Generator().manual_seed(7))[1])
            continue
        _, alone = assigners.pair(batch, cfg, torch.Generator().manual_seed(7))
        assert torch.equal(both, alone), name  # the same noise, bit for bit: global assignment, knn, vanilla


def test_resume_of_two_processes_is_bit_exact(ranks):
    _, (r0, _) = ranks
    whole, longer = (runs.open_run(p) for p in r0["resume"])
    a, b = final_state(whole), final_state(longer)
    assert all(torch.equal(a[k], b[k]) for k in a)  # dropout on: each rank's own stream was restored
    assert [m["loss"] for m in whole.metrics()] == [m["loss"] for m in longer.metrics()]
    state = checkpoint.load(checkpoint.list_checkpoints(longer)[-1].path)
    assert state["world_size"] == 2 and len(state["rng"]["torch_ranks"]) == 2
    assert not torch.equal(*state["rng"]["torch_ranks"])  # two dropout streams


def test_resume_on_another_number_of_processes_says_it_is_not_bit_exact(ranks, tmp_path):
    _, (r0, _) = ranks
    copy = tmp_path / "copy"
    shutil.copytree(r0["resume"][1], copy)
    result = runner.invoke(app, ["train", "--resume", str(copy), "--set", "train.total_kimg=0.048"])
    assert result.exit_code == 0, result.output
    assert "resumed on 1 process from a run saved on 2: not bit-exact (dropout streams reseeded)" in result.output
    rows = runs.open_run(copy).metrics()
    assert [(m["step"], m["world_size"]) for m in rows] == [(2, 2), (4, 2), (6, 1)]


# ------------------------------------------------------------------------------------------------------------------
# FID


def test_distributed_fid_equals_one_process(ranks, tmp_path, stub_fid):
    _, (r0, r1) = ranks
    (code0, out0), (code1, out1) = r0["eval"], r1["eval"]
    assert code0 == 0 and code1 == 0, out0 + out1
    assert "FID" in out0 and out1 == ""  # rank 0 reports
    (row,) = read_fid_rows(runs.open_run(r0["knn"]))  # one row, written once
    copy = tmp_path / "copy"
    shutil.copytree(r0["knn"], copy)
    (copy / runs.FID).unlink()
    result = runner.invoke(app, ["eval", str(copy), *EVAL])
    assert result.exit_code == 0, result.output
    (alone,) = read_fid_rows(runs.open_run(copy))
    assert row["num_images"] == alone["num_images"] == 10 and row["nfe"] == alone["nfe"]
    assert row["fid"] == pytest.approx(alone["fid"], rel=1e-6)  # the same images, sums reduced over the ranks
    assert row["kid"] == pytest.approx(alone["kid"], rel=1e-6, abs=1e-12)  # features gathered in seed order


# ------------------------------------------------------------------------------------------------------------------
# errors


def test_bad_batches_are_one_line_from_rank_0_and_write_nothing(ranks):
    root, (r0, r1) = ranks
    expected = {"indivisible": "train.batch_size: 7 is not divisible by the 2 processes; use a multiple of 2 (e.g. "
                               "6 or 8)",
                "too_many": "train.batch_size: a batch of 1 cannot be shared by 2 processes",
                "batch_gpu": "train.batch_gpu: 3 does not divide the 4 images each of the 2 process(es) gets"}
    for name, message in expected.items():
        (code0, out0), (code1, out1) = r0["errors"][name], r1["errors"][name]
        assert code0 == code1 == 2, (name, out0, out1)
        assert message in out0 and out0.count("error:") == 1 and out1 == "", (name, out0, out1)
    assert not (root / "bad").exists() or not any((root / "bad").iterdir())
    (code0, out0), (code1, out1) = r0["errors"]["dry_run"], r1["errors"]["dry_run"]
    assert code0 == code1 == 0 and "# dry run" in out0 and out1 == ""


def test_split_batch_in_one_process():
    cfg = load_config("quickstart", TINY + ["train.batch_gpu=3"])
    with pytest.raises(UserError, match="train.batch_gpu: 3 does not divide the 8 images"):
        train_ranks.split_batch(cfg, 1)
    assert train_ranks.split_batch(load_config("quickstart", TINY + ["train.batch_gpu=64"]), 2) == (4, 4)
    assert train_ranks.split_batch(load_config("quickstart", TINY + ["train.batch_gpu=2"]), 2) == (4, 2)


def test_one_process_helpers_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (distributed.rank(), distributed.world(), distributed.is_main()) == (0, 1, True)
    assert distributed.on_main(lambda: 5) == 5
    x = torch.arange(3.0)
    assert distributed.all_reduce(x, "mean") is x and torch.equal(x, torch.arange(3.0))
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match="IMMISCIBLE_DIST_TIMEOUT=soon: expected a number of seconds"):
        distributed.timeout_s()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.error_line(UserError("x")) == "rank 1: x"
    assert distributed.error_line(distributed.everywhere(UserError("x"))) is None


# ------------------------------------------------------------------------------------------------------------------
# the command line under torchrun, and ranks started by hand


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "immiscible_cli", "train"]


@pytest.mark.parametrize("attempt", range(3))
def test_torchrun_exits_cleanly_run_after_run(tmp_path, attempt):
    """Rank 0 once aborted in the interpreter's teardown after a finished run (SIGABRT, torchrun: FAILED) about
    once in eight runs; cli.main now ends a torchrun process with os._exit after flushing. Each of these one-step
    runs must exit 0 with its output complete (three cases: the abort was a race)."""
    done = subprocess.run([*TORCHRUN, "--out", str(tmp_path / "runs"), *sets(TINY + ["train.total_kimg=0.008"])],
                          cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "terminate called" not in done.stderr and done.stdout.count("run directory:") == 1


def test_torchrun_exits_with_the_command_s_code(tmp_path):
    bad = subprocess.run([*TORCHRUN, "--out", str(tmp_path / "bad"), *sets(TINY + ["train.lr=-1"])], cwd=tmp_path,
                         env=child_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and bad.stderr.startswith("error: --set train.lr=-1: train.lr")
    assert "exitcode  : 2" in bad.stderr  # torchrun's summary: the command's own code, not an abort (-6)


def test_torchrun_runs_the_cli_and_rank_0_writes(tmp_path, alone):
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "immiscible_cli", "train", "--out", str(out), *sets(TINY + NO_DROPOUT)]
    done = subprocess.run(command, cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("run directory:") == 1 and done.stdout.count("snapshot snapshot-") == 2
    (path,) = out.iterdir()
    run = runs.open_run(path)
    assert [m["world_size"] for m in run.metrics()] == [2, 2]
    assert json.loads((path / runs.META).read_text())["world_size"] == 2
    assert_same_steps(run, alone["vanilla"])


INJECT = """
import sys
from immiscible_cli import trainer
from immiscible_cli.errors import UserError
real = trainer.TrainingLoop.train_step
def failing(self):
    if self.step == 1:
        raise UserError("injected failure in step 2")
    real(self)
trainer.TrainingLoop.train_step = failing
from immiscible_cli.cli import main
sys.argv = ["immiscible", *sys.argv[1:]]
main()
"""


def test_a_failure_on_one_rank_ends_both_with_its_message(tmp_path):
    """Ranks started without torchrun's agent: rank 1 fails in its second step, rank 0 stops at the next collective
    (or after IMMISCIBLE_DIST_TIMEOUT) with one line, instead of waiting forever."""
    args = ["train", "--out", str(tmp_path / "runs"), *sets(TINY + ["train.total_kimg=0.064"])]
    port = str(free_port())
    procs = []
    for rank, head in ((0, ["-m", "immiscible_cli"]), (1, ["-c", INJECT])):
        env = child_env(tmp_path, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, IMMISCIBLE_DIST_TIMEOUT="60")
        procs.append(subprocess.Popen([sys.executable, *head, *args], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=900) for p in procs]
    (out0, err0), (out1, err1) = outputs
    assert procs[1].returncode == 2 and "error: rank 1: injected failure in step 2" in err1, err1
    assert procs[0].returncode == 4, out0 + err0
    assert "error: another process of this run stopped or did not answer within 60 s" in err0
    assert err0.count("error:") == 1 and "Traceback" not in err0
    run = runs.open_run(next((tmp_path / "runs").iterdir()))
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == []  # stopped before its first snapshot
