"""Throughput of an FID point, part by part: UNet sampling, the clean-fid resize, the Inception network, the
Frechet distance, and their total, on CUDA when present, else on the CPU (`--device all`: both).

    python benchmarks/fid.py                                   # quickstart UNet, 64 images, 20 steps
    python benchmarks/fid.py --preset cifar10-vanilla-fm --images 10000 --steps 50 --batch-size 1000 \\
        --precision bf16 --inception-precision fp16 --noise counter        # a 10k-image point on a GPU
    python benchmarks/fid.py --images 8 --steps 2 --batch-size 4 --stub-inception --frechet-dim 64   # smoke

The UNet is the preset's, with random weights (sampling costs the same as trained weights' for the fixed-step
samplers). "sampling" generates the images as an FID point does (seeds 0..N-1, `--noise`, `--precision`);
"resize" is the input pipeline alone (clean: PIL bicubic on worker threads; legacy_tensorflow: on the device);
"inception" is resize + network on those images, as the scorer streams them; "frechet" is the distance between
two D x D statistics (float64 eigenvalues on the device; `--scipy` adds scipy's sqrtm, the reference).
"total" = sampling + inception + frechet: an FID point without its (cached) reference statistics.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch

from immiscible_cli import networks, sampling
from immiscible_cli.config import load_config
from immiscible_cli.metrics import FIDExtractor, FIDWeightsError, WeightsInfo, frechet_distance, frechet_distance_eigh


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call of fn, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def report(name: str, images: int, seconds: float) -> None:
    print(f"  {name:<10} {images / seconds:10.1f} images/s   {seconds:8.2f} s for {images} images", flush=True)


def stub_network(x: torch.Tensor) -> torch.Tensor:  # [B, 3, 299, 299] -> [B, 16]: a stand-in for Inception
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)  # [B, 12]
    return torch.cat([pooled, pooled[:, :4].square()], dim=1)


def random_stats(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of 2 D random correlated features: a full-rank covariance like a 10k-image one."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2 * dim, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return features.mean(0), np.cov(features, rowvar=False)


def bench(device: torch.device, args: argparse.Namespace) -> None:
    cfg = load_config(args.preset, [f"sample.noise={args.noise}", *args.set])
    sampler, steps = args.sampler or cfg.eval.sampler, args.steps or cfg.eval.steps
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"{device.type} ({threads}): {args.images} images, preset {args.preset}, {sampler} {steps} steps, batch "
          f"{args.batch_size}, UNet {args.precision}, Inception {args.inception_precision}, noise {args.noise}, "
          f"mode {args.mode}", flush=True)
    torch.manual_seed(0)
    net = networks.build_network(cfg).to(device).eval()
    with torch.no_grad():
        for p in net.parameters():  # a fresh UNet's output layer is zero: give it something to compute
            p.normal_(0, 0.02)
    seeds = list(range(args.images))
    sampling.generate(net, cfg, seeds[:2], sampler=sampler, steps=1, batch=2, device=device,
                      precision=args.precision)  # warm-up
    sampling_s, images = timed(lambda: sampling.generate(net, cfg, seeds, sampler=sampler, steps=steps,
                                                         batch=args.batch_size, device=device,
                                                         precision=args.precision), device)
    report("sampling", args.images, sampling_s)
    batches = list(images.split(args.batch_size))  # uint8 [b, C, H, W]

    pipeline = FIDExtractor(args.mode, device, network=lambda x: x[:, :, 0, :8].flatten(1).float(),
                            batch_size=args.batch_size)
    pipeline.features(batches[:1])  # warm-up (thread pool, pinned buffers, CUDA context)
    report("resize", args.images, timed(lambda: pipeline.features(batches), device)[0])

    try:
        if args.stub_inception:
            extractor = FIDExtractor(args.mode, device, network=stub_network, batch_size=args.batch_size,
                                     info=WeightsInfo("stub", "", "0" * 64, "float32"))
        else:
            extractor = FIDExtractor(args.mode, device, weights=args.weights, batch_size=args.batch_size,
                                     precision=args.inception_precision if device.type == "cuda" else "fp32")
    except FIDWeightsError as e:
        print(f"  inception  skipped: {e}")
        return
    extractor.features(batches[:1])  # warm-up (cuDNN algorithm choice)
    inception_s, stats = timed(lambda: extractor.stats(batches), device)
    report("inception", args.images, inception_s)

    mu1, sigma1 = random_stats(args.frechet_dim, 1)
    mu2, sigma2 = random_stats(args.frechet_dim, 2)
    frechet_distance_eigh(mu1[:8], sigma1[:8, :8], mu2[:8], sigma2[:8, :8], device=device)  # warm-up (solver)
    frechet_s, fid = timed(lambda: frechet_distance_eigh(mu1, sigma1, mu2, sigma2, device=device), device)
    print(f"  frechet    {frechet_s:8.2f} s (D = {args.frechet_dim}, float64 eigenvalues on {device.type})", flush=True)
    if args.scipy:
        scipy_s, reference = timed(lambda: frechet_distance(mu1, sigma1, mu2, sigma2), torch.device("cpu"))
        print(f"  scipy      {scipy_s:8.2f} s (sqrtm; |difference| {abs(fid - reference):.2e})", flush=True)
    total = sampling_s + inception_s + frechet_s
    print(f"  total      {total:8.2f} s for an FID point of {args.images} images ({stats.count} scored); weights "
          f"{extractor.weights.source} ({extractor.weights.dtype}, run in {extractor.precision})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images of the FID point")
    parser.add_argument("--batch-size", type=int, default=32, help="images per sampling and network batch")
    parser.add_argument("--preset", default="quickstart", help="preset whose UNet, objective and data shape are used")
    parser.add_argument("--set", action="append", default=[], help="a --set override of the preset (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's eval.steps)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the preset's eval.sampler)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the UNet's, while sampling")
    parser.add_argument("--inception-precision", choices=["fp32", "fp16"], default="fp32", help="on CUDA only")
    parser.add_argument("--noise", choices=["per-image", "counter"], default="per-image", help="sample.noise")
    parser.add_argument("--mode", choices=["clean", "legacy_tensorflow"], default="clean")
    parser.add_argument("--weights", default=None, help="Inception weights file (default: the usual lookup)")
    parser.add_argument("--stub-inception", action="store_true", help="a tiny stand-in network (smoke tests)")
    parser.add_argument("--frechet-dim", type=int, default=2048, help="feature dimension of the Frechet timing")
    parser.add_argument("--scipy", action="store_true", help="also time scipy's sqrtm (slow on a CPU at D = 2048)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                        help="auto: CUDA when present, else the CPU; all: the CPU, then CUDA when present")
    parser.add_argument("--no-cpu", action="store_true", help="only CUDA (as --device cuda)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    choice = "cuda" if args.no_cpu else args.device
    devices = [torch.device("cpu")] if choice in ("cpu", "all") or (choice == "auto" and not cuda) else []
    devices += [torch.device("cuda")] if cuda and choice in ("cuda", "all", "auto") else []
    if not devices:
        parser.error("--device cuda: CUDA is not available here")
    for device in devices:
        bench(device, args)


if __name__ == "__main__":
    main()
