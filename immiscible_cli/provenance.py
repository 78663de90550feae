"""meta.json's provenance of a run: the command line, versions, the git checkout, the device, the start time."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def provenance(argv: list[str] | None, device: str) -> dict[str, Any]:
    """meta.json: what produced this run."""
    import torch

    from . import __version__

    return {
        "argv": list(argv if argv is not None else sys.argv),
        "cwd": os.getcwd(),
        "immiscible_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        **git_state(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def git_state(here: Path | None = None) -> dict[str, Any]:
    """The checkout the package runs from (an installed wheel has none): `git_sha`, its HEAD, and `git_dirty`,
    whether the package's tracked files differ from it (uncommitted edits then shaped the run too; files git does
    not track are not counted); None when unknown."""
    here = Path(here or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".") if sha else None
    return {"git_sha": sha, "git_dirty": None if changes is None else bool(changes)}
