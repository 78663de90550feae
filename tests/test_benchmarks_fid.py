"""benchmarks/fid.py runs end to end on the CPU with tiny options and reports every part of an FID point."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

from conftest import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fid.py"


def test_fid_benchmark_smoke(monkeypatch, capsys):
    sets = [arg for item in TINY for arg in ("--set", item)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--images", "6", "--steps", "2", "--batch-size", "4",
                                      "--stub-inception", "--frechet-dim", "32", "--scipy", "--noise", "counter",
                                      *sets])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "cpu (" in out and "noise counter" in out
    for part in ("sampling", "resize", "inception"):
        assert re.search(rf"^  {part} +[0-9.]+ images/s +[0-9.]+ s for 6 images$", out, re.M), (part, out)
    assert re.search(r"^  frechet +[0-9.]+ s \(D = 32", out, re.M)
    difference = float(re.search(r"\|difference\| ([0-9.e+-]+)", out).group(1))
    assert difference < 1e-6  # the eigenvalue distance agrees with scipy's sqrtm on full-rank statistics
    assert re.search(r"^  total +[0-9.]+ s for an FID point of 6 images \(6 scored\); weights stub", out, re.M)
