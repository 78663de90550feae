"""The wheel (what `pip install .` installs) carries the presets and the embedded dataset."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from immiscible_cli.config import list_presets

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_presets_and_embedded_data(tmp_path):
    pytest.importorskip("setuptools", minversion="77", reason="the test extra installs setuptools>=77")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("immiscible-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in list_presets():
        assert f"immiscible_cli/presets/{preset}.yaml" in names, preset
    for asset in ("fashion-mnist-10k-images-idx3-ubyte.xz", "fashion-mnist-10k-labels-idx1-ubyte.xz",
                  "LICENSE-fashion-mnist"):
        assert f"immiscible_cli/assets/{asset}" in names, asset
    assert wheel.stat().st_size < 5 * 2**20
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "immiscible = immiscible_cli.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
