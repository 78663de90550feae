"""The benchmark scripts run: benchmarks/train_step.py as a tiny CPU smoke test (rows, not speeds), and
benchmarks/gpu_check.sh parses and prints its plan without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_prints_a_row_per_configuration(tmp_path, capsys):
    torch.set_num_threads(1)  # two OpenMP threads spin against each other on a loaded 2-core machine
    rows = load_script("train_step").main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1",
                                           "--json", str(tmp_path / "rows.json")])
    printed = capsys.readouterr().out
    names = ["peer eager fp32", "vanilla eager", "knn eager", "linear eager"]
    assert [row["config"] for row in rows] == names
    for row in rows:
        assert row["img_per_s"] > 0 and row["ratio"] > 0 and row["peak_mib"] > 0
        line = next(line for line in printed.splitlines() if line.startswith(row["config"] + " "))
        assert float(line.split()[-3]) > 0  # the img/s column
    assert rows[0]["ratio"] == 1.0 and (tmp_path / "rows.json").is_file()


def test_gpu_check_script_parses_and_its_dry_run_lists_every_step(tmp_path):
    script = BENCHMARKS / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": "false"}  # a dry run runs no python
    done = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path / "bundle")], capture_output=True,
                          text=True, env=env, cwd=BENCHMARKS.parent, timeout=60)
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    assert "benchmarks/train_step.py --device cuda" in plan
    fid = next(line for line in plan.splitlines() if "benchmarks/fid.py" in line)
    assert "--images 10000" in fid and f"--weights {tmp_path / 'bundle' / 'inception-fp16.pt'}" in fid
    assert "-m pytest -q -m cuda" in plan
    table = (tmp_path / "out" / "table.txt").read_text()
    assert all(name in table for name in ("deps", "train_step", "fid", "pytest_cuda"))
