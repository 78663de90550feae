"""Checkpoint files: names, listing (oldest first), and what is not a snapshot."""

from __future__ import annotations

from immiscible_cli import checkpoint, runs
from immiscible_cli.config import load_config


def test_checkpoint_paths_and_listing(tmp_path):
    run = runs.create_run(tmp_path, load_config("quickstart"))
    for kimg in (2.0, 10.5, 4.0):
        checkpoint.path_for(run, kimg).write_bytes(b"x")
    (run.path / "checkpoints" / "notes.txt").write_text("ignored")
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [2.0, 4.0, 10.5]
    assert checkpoint.path_for(run, 10.5).name == "snapshot-000010.500kimg.pt"
