"""A kept network (train.keep_network's format) from a snapshot a study left on disk, in a run folder of its own, so
that a sampling idea can be rescored at that point of training without a retrain.

    python docs/results/fashion-mnist/checks/network_at.py RUN SNAPSHOT OUT

RUN is the run that wrote SNAPSHOT (its config.yaml and meta.json are copied); OUT is a new folder that `immiscible
eval` and `sample` read as a run whose only weights are SNAPSHOT's EMA network and noise moments (the kept-network
dict: the snapshot's without `net`, `optimizer`, `rng` and `data`). Used for vanilla seed 0 at 60 kimg, taken from
the 120-kimg extension's snapshot-000060.032kimg.pt (part 1's 60-kimg vanilla runs kept no network), so that the
part-2 networks of seed 0 have a vanilla network to be compared with.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from immiscible_cli import checkpoint, runs

DROPPED = ("format", "net", "optimizer", "rng", "data")


def main(run_dir: str, snapshot: str, out: str) -> None:
    source, target = Path(run_dir), Path(out)
    if target.exists():
        raise SystemExit(f"{target} exists: give a new folder")
    state = torch.load(snapshot, map_location="cpu", weights_only=True)
    target.mkdir(parents=True)
    for name in (runs.CONFIG, "meta.json"):
        shutil.copy2(source / name, target / name)
    path = checkpoint.save_network(runs.open_run(target), {k: v for k, v in state.items() if k not in DROPPED})
    kept = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(kept["ema"][k], state["ema"][k]) for k in state["ema"])  # bit-equal EMA weights
    print(f"{path}: EMA weights of {snapshot} at {state['kimg']:.3f} kimg (step {state['step']})")


if __name__ == "__main__":
    main(*sys.argv[1:])
