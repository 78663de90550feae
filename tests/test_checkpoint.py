"""Checkpoint files: names, listing (oldest first), and what is not a snapshot."""

from __future__ import annotations

from immiscible_cli import checkpoint, run_create
from immiscible_cli.config import load_config


def test_checkpoint_paths_and_listing(tmp_path):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    for kimg in (2.0, 10.5, 4.0):
        checkpoint.path_for(run, kimg).write_bytes(b"x")
    (run.path / "checkpoints" / "notes.txt").write_text("ignored")
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [2.0, 4.0, 10.5]
    assert checkpoint.path_for(run, 10.5).name == "snapshot-000010.500kimg.pt"


def test_prune_keeps_the_snapshot_of_the_step_that_crossed_each_multiple(tmp_path):
    """Batch 128, snapshots every 6 kimg land on 6.016, 12.032, ...: keep_every_kimg 12 keeps 12.032 and 24.064."""
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    for kimg in (6.016, 12.032, 18.048, 24.064, 30.080):
        checkpoint.path_for(run, kimg).write_bytes(b"x")
    checkpoint.prune(run, keep_last=1, keep_every_kimg=12, batch_size=128)
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [12.032, 24.064, 30.08]
    checkpoint.prune(run, keep_last=1, keep_every_kimg=0, batch_size=128)
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [30.08]
