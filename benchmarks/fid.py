"""Throughput of our FID extractor: resize, network and end to end, on the CPU and on CUDA when present.

    python benchmarks/fid.py                       # 64 images of 32x32 RGB, clean mode
    python benchmarks/fid.py --images 512 --batch-size 250 --mode legacy_tensorflow --weights PATH

Prints images/s and seconds per 1000 images for each part. "resize" is the whole input pipeline without the
network (clean: PIL bicubic per channel on worker threads into reused buffers, then the copy to the device;
legacy_tensorflow: the in-network bilinear resize on the device); "network" is the Inception trunk on
already-resized input.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from immiscible_cli.metrics import FIDExtractor, FIDWeightsError, load_inception
from immiscible_cli.metrics.features import CPU_NETWORK_BATCH


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of fn, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def report(name: str, images: int, seconds: float) -> None:
    rate = images / seconds
    print(f"  {name:<12} {rate:10.1f} images/s   {1000 / rate:9.2f} s per 1000 images")


def bench(device: torch.device, args: argparse.Namespace) -> None:
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else f" ({torch.cuda.get_device_name()})"
    print(f"{device.type}{threads}: mode {args.mode}, batch {args.batch_size}, {args.images} images "
          f"{args.resolution}x{args.resolution}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.resolution, args.resolution), dtype=torch.uint8,
                           generator=generator)  # [N, 3, H, W]
    batches = list(images.split(args.batch_size))

    # The pipeline with a network that only touches its input: resize + copy to the device.
    pipeline = FIDExtractor(args.mode, device, network=lambda x: x[:, :, 0, :8].flatten(1), batch_size=args.batch_size)
    pipeline.features(batches[:1])  # warm-up (thread pool, pinned buffers, CUDA context)
    report("resize", args.images, timed(lambda: pipeline.features(batches), device))

    try:
        net, info = load_inception(args.weights, device)
    except FIDWeightsError as e:
        print(f"  network      skipped: {e}")
        return
    x = torch.rand((min(args.batch_size, args.images), 3, 299, 299), generator=generator).to(device) * 2 - 1
    # As the extractor calls it: in sub-batches of CPU_NETWORK_BATCH on the CPU, whole batches on CUDA.
    parts = x.split(CPU_NETWORK_BATCH) if device.type == "cpu" else [x]
    with torch.inference_mode():
        net(x[:2])  # warm-up
        runs = max(1, args.images // len(x))
        seconds = timed(lambda: [net(part) for _ in range(runs) for part in parts], device)
    report("network", runs * len(x), seconds)

    extractor = FIDExtractor(args.mode, device, weights=args.weights, batch_size=args.batch_size)
    report("end to end", args.images, timed(lambda: extractor.features(batches), device))
    print(f"  weights: {info.source} {info.path} ({info.dtype})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=32, help="images per network batch")
    parser.add_argument("--resolution", type=int, default=32, help="side of the input images, in pixels")
    parser.add_argument("--mode", choices=["clean", "legacy_tensorflow"], default="clean")
    parser.add_argument("--weights", default=None, help="Inception weights file (default: the usual lookup)")
    parser.add_argument("--no-cpu", action="store_true", help="only CUDA")
    args = parser.parse_args()
    devices = [] if args.no_cpu else [torch.device("cpu")]
    devices += [torch.device("cuda")] if torch.cuda.is_available() else []
    for device in devices:
        bench(device, args)


if __name__ == "__main__":
    main()
