"""What each of the 2 CPU processes of test_distributed.py does (spawned once; gloo): the library's multi-process
scenarios one after the other, each rank's results saved to ROOT/rankR.pt for the tests to compare with one
process."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

from conftest import TINY, StubNetwork

NO_DROPOUT = ["model.dropout=0"]
KNN = ["assigner.k=4"]
EVAL = ["--fid", "--kid", "--num-images", "10", "--batch", "4", "--steps", "2", "--reference-images", "8",
        "--ckpt", "latest"]
PAIRINGS = {  # name -> assigner section; KNN with a tiny budget also splits its candidates into chunks
    "vanilla": {"name": "vanilla"}, "knn": {"name": "knn", "k": 5},
    "knn_chunked": {"name": "knn", "k": 5, "memory_budget_mib": 0.001},
    "linear_global": {"name": "linear", "scope": "global"}, "linear_local": {"name": "linear", "scope": "local"},
    "linear_fp16": {"name": "linear", "scope": "global", "quantize": "fp16", "image_scale": 2.0},
}


def sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def pairing_batch() -> torch.Tensor:
    """The global batch of the pairing checks: 8 images [8, 1, 8, 8]."""
    return torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def assigner(name: str):
    from immiscible_cli.config import KNNAssigner, LinearAssigner, VanillaAssigner

    section = dict(PAIRINGS[name])
    return {"vanilla": VanillaAssigner, "knn": KNNAssigner, "linear": LinearAssigner}[section["name"]](**section)


def two_ranks(rank: int, world: int, port: int, root: str) -> None:
    """Entry point of torch.multiprocessing.spawn: join a gloo group as torchrun would, run every scenario."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), IMMISCIBLE_CACHE=str(Path(root) / "cache"))
    torch.set_num_threads(1)
    os.chdir(root)
    from immiscible_cli import distributed

    results = {}
    with distributed.session():
        results["errors"] = cli_errors(Path(root))
        results["pairing"] = pairings(rank, world)
        results["knn"] = str(train(TINY + NO_DROPOUT + KNN, Path(root) / "knn", "quickstart-knn").path)
        results["accumulate"] = str(train(TINY + NO_DROPOUT + ["train.batch_gpu=2"], Path(root) / "acc").path)
        results["resume"] = resume(Path(root))
        results["eval"] = evaluate(results["knn"])
    torch.save(results, Path(root) / f"rank{rank}.pt")
    # End as the console script does under torchrun (cli.main): the interpreter's teardown can abort in a C++
    # destructor of torch.distributed ("terminate called without an active exception"), which spawn reports as a
    # failed process although every result is saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train(overrides: list[str], out: Path, preset: str = "quickstart", **kwargs):
    from immiscible_cli import trainer
    from immiscible_cli.config import load_config

    return trainer.train(load_config(preset, overrides), out_root=out, **kwargs)


def cli_errors(root: Path) -> dict[str, tuple[int, str]]:
    """Bad input through the command line: (exit code, output) on this rank."""
    from typer.testing import CliRunner

    from immiscible_cli.cli import app

    cases = {"indivisible": ["train.batch_size=7"], "too_many": ["train.batch_size=1"],
             "batch_gpu": ["train.batch_gpu=3"]}
    found = {}
    for name, extra in cases.items():
        result = CliRunner().invoke(app, ["train", "--out", str(root / "bad"), *sets(TINY + extra)])
        found[name] = (result.exit_code, result.output)
    result = CliRunner().invoke(app, ["train", "--dry-run", "--out", str(root / "bad"), *sets(TINY)])
    found["dry_run"] = (result.exit_code, result.output)
    return found


def pairings(rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's noise for its rows of `pairing_batch()`, per rule, from a generator seeded 7."""
    from immiscible_cli.assigners import pair, shard

    part = shard.Shard(rank, world, 8)
    x = pairing_batch()[part.rows]
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # knn_chunked is below its minimum budget, on purpose
        for name in PAIRINGS:
            stats: dict = {}
            found[name] = pair(x, assigner(name), torch.Generator().manual_seed(7), stats, shard=part)[1]
            assert set(stats) == {"pair_dist", "random_dist", "noise_sqnorm"}
    return found


def resume(root: Path) -> tuple[str, str]:
    """(whole run, the same run trained half-way then resumed), with dropout on."""
    whole = train(TINY, root / "whole")
    half = train(TINY + ["train.total_kimg=0.016"], root / "half")
    longer = train(TINY, root, run_dir=half.path, resume=True)
    return str(whole.path), str(longer.path)


def patch_stub_fid() -> None:
    """conftest.stub_fid for this process: FID features from StubNetwork, no Inception weights."""
    from immiscible_cli import evaluate
    from immiscible_cli.metrics import FIDExtractor, WeightsInfo, scorer

    def make(mode="clean", device="cpu", weights=None, batch_size=64, **_):
        return FIDExtractor(mode, device, batch_size=batch_size, network=StubNetwork(),
                            info=WeightsInfo("stub", "", "0" * 64, "float32"))

    evaluate.FIDExtractor = make
    scorer.FIDExtractor = make


def evaluate(run: str) -> tuple[int, str]:
    """`eval --fid --kid` of the run's newest checkpoint on both ranks (rank 0 writes the row)."""
    from typer.testing import CliRunner

    from immiscible_cli.cli import app

    patch_stub_fid()
    result = CliRunner().invoke(app, ["eval", run, *EVAL])
    return result.exit_code, result.output
