"""The README's two commands are what CI runs, and every preset and command appears in the README."""

from __future__ import annotations

import re
from pathlib import Path

from immiscible_cli.config import list_presets

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv .*)\n```", text)


def test_two_commands_at_the_top():
    install_and_train, install_and_test = readme_commands()[:2]
    assert install_and_train.endswith("immiscible train")
    assert install_and_test.endswith("python -m pytest")


def test_ci_runs_the_readme_install_and_test_command():
    _, install_and_test = readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    steps = install_and_test.split(" && ")
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    install, test = " && ".join(steps[2:-1]), steps[-1]
    assert install in ci.splitlines() and test in ci.splitlines()
    assert "set -euo pipefail" in ci


def test_readme_mentions_every_preset_and_command():
    text = (ROOT / "README.md").read_text()
    for name in list_presets():
        assert f"`{name}`" in text, name
    for command in ("train", "sample", "eval", "compare", "presets", "encode"):
        assert f"immiscible {command}" in text
