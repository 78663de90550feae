"""Fake run directories for the `immiscible compare` tests (test_compare.py, test_compare_seeds.py): a config, metrics
ticks and fid.jsonl rows exactly as the trainer writes them, plus helpers that run the command through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from immiscible_cli.cli import app
from immiscible_cli.config import Config

SETTINGS: dict[str, Any] = {
    "num_images": 10000, "mode": "clean", "sampler": "euler", "steps": 50, "guidance": 1.0, "ema": True,
    "reference": {"name": "embedded", "split": "train", "num_images": 10000, "mode": "clean", "weights_sha256": "a" * 64},
    "weights": {"source": "bundled", "sha256": "b" * 64, "dtype": "float32"},
}


def make_run(root: Path, dirname: str, points: list[tuple[float, float]], *, assigner: dict | None = None,
             seed: int = 0, seconds_per_kimg: float | None = 10.0, settings: dict | None = None,
             extra_rows: list[dict] = (), batch_size: int = 128) -> Path:
    """A run directory as the trainer writes it, with FID (kimg, fid) points; train_s = kimg * seconds_per_kimg."""
    path = root / dirname
    path.mkdir()
    config = Config.model_validate({"name": dirname.split("-", 1)[1], "seed": seed, "objective": {"kind": "flow"},
                                    "assigner": assigner or {"name": "vanilla"}, "train": {"batch_size": batch_size}})
    (path / "config.yaml").write_text(config.to_yaml())
    (path / "meta.json").write_text("{}")
    last = max(k for k, _ in points)
    ticks = [{"kimg": k, "step": int(k * 1000 / batch_size), "loss": 0.1, "lr": 2e-4, "img_per_s": 100.0,
              "assign_ms": 0.1, "pair_dist": 1.0, "pair_dist_reduction": 0.02, "noise_sqnorm": 1.0,
              "train_s": k * (seconds_per_kimg or 10.0), "peak_mem_mib": 10.0, "time": "t"}
             for k in range(10, int(last) + 11, 10)]  # the trainer ticks a little past the last FID point
    (path / "metrics.jsonl").write_text("".join(json.dumps(t) + "\n" for t in ticks))
    rows = [{"kimg": k, "step": 0, "fid": fid, **(settings or SETTINGS), "seconds": 1.0,
             "train_s": None if seconds_per_kimg is None else k * seconds_per_kimg, "time": "t"}
            for k, fid in points]
    (path / "fid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra_rows]))
    return path


def invoke(*args: str):
    """`immiscible compare ARGS` through the CLI; never a traceback."""
    result = CliRunner().invoke(app, ["compare", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def as_json(*args: str) -> dict[str, Any]:
    """`immiscible compare ARGS --json`, parsed; it must succeed."""
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # the whole of stdout is one JSON document
