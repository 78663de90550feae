"""Does KNN's smaller training noise explain its FID here? Score one checkpoint with the starting noise x_T drawn
from N(0, s^2 I) for several s (sample.start_std), everything else as in the run's own FID points.

KNN keeps, of k draws, the noise nearest the image: its norm is smaller (metrics.jsonl `noise_sqnorm`, 0.954 at
k = 8 on 28 px Fashion-MNIST, D = 784), so a KNN-trained network never saw a start as large as N(0, I)'s. If that
mismatch is what costs FID, s = sqrt(noise_sqnorm) should score clearly better than s = 1.

    python docs/results/fashion-mnist/start-noise/measure.py RUN --ckpt 60.032 --std 1.0 0.9767 --out FILE.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from immiscible_cli import runs
from immiscible_cli.metrics.scorer import FIDScorer
from immiscible_cli.networks import load_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--ckpt", default="latest")
    parser.add_argument("--std", type=float, nargs="+", default=[1.0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL file the rows are appended to")
    parser.add_argument("--inception", default=None)
    args = parser.parse_args()
    run = runs.open_run(args.run)
    net, cfg, chosen, _ = load_network(run, args.ckpt, ema=True)
    for std in args.std:
        cfg_s = cfg.model_copy(deep=True)
        cfg_s.sample.start_std = std
        scorer = FIDScorer(cfg_s, torch.device("cpu"), inception=args.inception)
        began = time.time()
        row = scorer.score(net, kimg=chosen.kimg, step=0, train_s=0.0)
        row.update(run=run.path.name, start_std=std, wall_s=round(time.time() - began, 1))
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{run.path.name}  ckpt {chosen.kimg:g} kimg  start_std {std:.4f}  FID {row['fid']:.2f}  "
              f"({row['num_images']} images, {row['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
