"""Throughput of our training step (each assigner, eager and compiled) beside a peer-style eager fp32 step of the
same UNet, in the same process.

A script, not a test:  python benchmarks/train_step.py [--device cuda|cpu] [--tiny] [--batch 128] [--steps 30]
                       [--modes eager,compiled] [--assigners vanilla,knn,linear] [--json FILE]

Our step is `trainer.TrainingLoop.train_step` on the cifar10-vanilla preset's model (35.7M parameters) at 32x32x3,
batch 128 (random uint8 images, resident on the GPU): data, pairing, timesteps, loss, backward, clip, Adam, EMA,
with train.precision `auto` (bf16 autocast on CUDA; --precision fp32 for the preset's own). "compiled" is
train.compile + train.cuda_graphs + train.channels_last on CUDA (train.compile alone on the CPU). The peer step is
what torchcfm's CIFAR-10 example does, in fp32 eager: forward, MSE on eps, backward, grad clip, Adam (not fused),
EMA as a Python loop over the parameters.

Each configuration: --warmup steps (not timed: compilation, cudnn autotuning), then --steps steps timed with the
device synchronised at both ends. Columns: img/s, ratio to the peer, peak memory (torch.cuda.max_memory_allocated
per configuration; on the CPU the process's peak resident set, which only grows). `--tiny`: a 16x16x1 two-level
UNet, batch 8, 3 steps: a smoke test that runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from immiscible_cli import run_create, runs, train_loop, trainer
from immiscible_cli.config import load_config
from immiscible_cli.data import ImageSet
from immiscible_cli.networks import build_network
from immiscible_cli.objectives import build_objective

TINY = ["data.resolution=16", "data.channels=1", "model.channels=8", "model.channel_mult=[1, 2]",
        "model.num_res_blocks=1", "model.attn_resolutions=[8]", "model.head_channels=8"]
ASSIGNERS = {"vanilla": ["assigner.name=vanilla"], "knn": ["assigner.name=knn", "assigner.k=8"],
             "linear": ["assigner.name=linear"]}


def settings(args: argparse.Namespace, assigner: str, mode: str) -> list[str]:
    fast = ["train.compile=true"]
    if args.device == "cuda":
        fast += ["train.cuda_graphs=true", "train.channels_last=true"]
    return [*(TINY if args.tiny else []), *ASSIGNERS[assigner], f"train.batch_size={args.batch}",
            f"train.device={args.device}", "train.warmup_kimg=0", f"train.precision={args.precision}",
            *(fast if mode == "compiled" else [])]


def synthetic_images(cfg, count: int) -> ImageSet:
    """Random uint8 images of the configured shape (throughput does not depend on their content)."""
    shape = (count, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageSet(images, torch.zeros(count, dtype=torch.long), 10, "synthetic")


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds for `steps` calls of step() after `warmup` untimed ones, the device drained at both ends."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def peak_mib(device: torch.device) -> float:
    return train_loop.peak_memory_mib(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ours(args: argparse.Namespace, assigner: str, mode: str, device: torch.device, folder: Path) -> float:
    cfg = load_config("cifar10-vanilla", settings(args, assigner, mode))
    run = run_create.create_run(folder, cfg)
    loop = trainer.TrainingLoop(cfg, run, synthetic_images(cfg, max(4 * args.batch, 512)), device)
    return timed_steps(loop.train_step, device, args.warmup, args.steps)


def peer(args: argparse.Namespace, device: torch.device) -> float:
    """torchcfm-style: fp32 eager, plain Adam, clip, and an EMA written as a Python loop over the parameters."""
    cfg = load_config("cifar10-vanilla", settings(args, "vanilla", "eager"))  # only the model and the schedule
    torch.manual_seed(0)
    net = build_network(cfg).to(device).train()
    ema = build_network(cfg).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    objective = build_objective(cfg.objective)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    images = synthetic_images(cfg, max(4 * args.batch, 512)).images.to(device)
    position = [0]

    def step() -> None:
        start = position[0] % (len(images) - args.batch)
        position[0] += args.batch
        x0 = images[start:start + args.batch].float() / 127.5 - 1  # [B, C, H, W]
        noise = torch.randn_like(x0)
        t = torch.randint(0, objective.T, (args.batch,), device=device)
        abar = objective.alpha_bar.float().to(device)[t].view(-1, 1, 1, 1)  # copied every step, as peers do
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        loss = torch.nn.functional.mse_loss(net(x_t, t.float()), noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for target, source in zip(ema.parameters(), net.parameters()):
                target.data.copy_(target.data * 0.9999 + source.data * (1 - 0.9999))

    return timed_steps(step, device, args.warmup, args.steps)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet, batch 8, 3 steps: a smoke test")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 128; tiny: 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; tiny: 1)")
    parser.add_argument("--modes", default=None, help="eager,compiled (default: both on CUDA, eager on the CPU)")
    parser.add_argument("--assigners", default="vanilla,knn,linear")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="our step's train.precision (auto: bf16 autocast on CUDA); the peer is always fp32")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.batch = args.batch or (8 if args.tiny else 128)
    args.steps = args.steps or (3 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    modes = (args.modes or ("eager,compiled" if args.device == "cuda" else "eager")).split(",")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"train step, {name}, torch {torch.__version__}, batch {args.batch}, {args.steps} timed steps after "
          f"{args.warmup}{' (tiny model)' if args.tiny else ''}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        reset_peak(device)
        seconds = peer(args, device)
        base = args.batch * args.steps / seconds
        rows.append({"config": "peer eager fp32", "img_per_s": base, "ratio": 1.0, "peak_mib": peak_mib(device)})
        print(f"{'config':<22} {'img/s':>10} {'x peer':>8} {'peak MiB':>10}")
        print(f"{rows[0]['config']:<22} {base:10.1f} {1.0:8.2f} {rows[0]['peak_mib']:10.0f}", flush=True)
        for mode in modes:
            for assigner in args.assigners.split(","):
                reset_peak(device)
                rate = args.batch * args.steps / ours(args, assigner, mode, device, Path(folder))
                row = {"config": f"{assigner} {mode}", "img_per_s": rate, "ratio": rate / base,
                       "peak_mib": peak_mib(device)}
                rows.append(row)
                print(f"{row['config']:<22} {rate:10.1f} {row['ratio']:8.2f} {row['peak_mib']:10.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "batch": args.batch, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
