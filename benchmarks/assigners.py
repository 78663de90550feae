"""Time the pairing rules against the papers' published code, on the CPU and (when present) CUDA.

A script, not a test:  python benchmarks/assigners.py [--device cpu|cuda|all] [--quick] [--repeats N] [--threads N]
                       python benchmarks/assigners.py --solvers   # scipy vs LAPJV (assigner.solver) at B = 1024-4096
                       python benchmarks/assigners.py --scores    # KNN's knn_score: l2 vs direction vs centred

Grid: B in {128, 256, 512, 1024, 2048}, D in {3x32x32, 4x64x64}, k in {4, 8, 64} (KNN); linear runs with
`quantize: fp16` (the published setting) and `none`. Both implementations run in the same process, interleaved,
on the same data: warm-up, then the median of at least --repeats timed calls (more for cheap cells, fewer for
cells over a few seconds), with torch.cuda.synchronize around each CUDA call.

"our peak MiB" is our extra memory beyond x0 and the returned noise: torch.cuda.max_memory_allocated on CUDA; on
the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) of a child process run with
MALLOC_MMAP_THRESHOLD_=65536, so every tensor is a fresh mapping and freed memory leaves the resident set at once.
"planned MiB" is KNN's own accounting (`knn.chunk_bytes`), which the budget bounds.

Published cells that need more than a third of the free memory are skipped with the reason, and so are those the
published code would take minutes over. A full CPU run takes about 4 minutes on 2 cores. On a shared machine every
multi-threaded op can stall on other jobs: the load average is printed, and --threads 1 removes that noise.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from scipy.optimize import linear_sum_assignment

from immiscible_cli.assigners import knn, pair
from immiscible_cli.config import KNNAssigner, LinearAssigner

BATCHES = (128, 256, 512, 1024, 2048)
SHAPES = {"3x32x32": (3, 32, 32), "4x64x64": (4, 64, 64)}
KS = (4, 8, 64)
QUICK = {"batches": (128, 1024), "ks": (4, 64)}
CELL_SECONDS = 4.0  # stop repeating a cell's timings once one implementation has spent this long on it


# ---- PUBLISHED CODE ---------------------------------------------------------------------------------------------
# A faithful re-implementation, for timing only, of github.com/yhli123/Immiscible-Diffusion (MIT):
# KNN as in KNN-flow_matching/knnpackage/torchcfm/optimal_transport.py (sample_plan) and KNN-stable_diffusion;
# linear assignment as in Linear_Assignment-stable_diffusion/conditional_ft_train_sd.py (single process, so its
# all_gather is the identity). Same operations, dtypes and intermediate shapes; only the random draws take our
# generator.

def published_knn(x0: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    batch, shape = x0.shape[0], x0.shape[1:]
    candidates = torch.randn(batch, k, *shape, generator=generator, device=x0.device, dtype=x0.dtype)  # [B, k, ...]
    x_points = x0.flatten(start_dim=1).to(torch.float16)  # [B, D]
    c_points = candidates.flatten(start_dim=2).to(torch.float16)  # [B, k, D]
    distance = torch.linalg.vector_norm(x_points.unsqueeze(1) - c_points, dim=2)  # [B, k], fp16
    _, min_index = torch.min(distance, dim=1)  # [B]
    index = min_index.view(batch, 1, *[1] * len(shape)).expand(-1, -1, *shape)
    return torch.gather(candidates, 1, index)[:, 0]  # [B, C, H, W]


def published_linear(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # [B, C, H, W]
    distance = torch.linalg.vector_norm(0.10 * x0.to(torch.float16).flatten(start_dim=1).unsqueeze(1)
                                        - 0.10 * noise.to(torch.float16).flatten(start_dim=1).unsqueeze(0), dim=2)
    _, col_ind = linear_sum_assignment(distance.cpu().numpy())  # [B, B] fp16 on the host
    return noise[torch.from_numpy(col_ind).to(x0.device)]
# ---- END OF PUBLISHED CODE --------------------------------------------------------------------------------------


def published_bytes(rule: str, batch: int, dim: int, k: int) -> int:
    """Peak memory of the published code: fp32 candidates + fp16 copy + fp16 difference; or the [B, B, D] fp16
    difference (plus its scaled operand) of linear assignment."""
    return batch * k * dim * (4 + 2 + 2) if rule == "knn" else batch * batch * dim * 2 * 2


def published_seconds(rule: str, batch: int, dim: int, k: int) -> float:
    """Rough CPU time of the published code, to skip cells that would take minutes (4 ns per element and pass)."""
    elements = batch * k * dim if rule == "knn" else batch * batch * dim
    return elements * 4e-9 * (3 if rule == "knn" else 2)


def cells(quick: bool) -> list[tuple[str, str, int, str, int]]:
    """(rule, variant, B, shape name, k) for every row of the table."""
    batches, ks = (QUICK["batches"], QUICK["ks"]) if quick else (BATCHES, KS)
    rows = []
    for shape in SHAPES:
        for batch in batches:
            rows += [("knn", f"k={k}", batch, shape, k) for k in ks]
            rows += [("linear", f"{q}", batch, shape, 0) for q in ("fp16", "none")]
    return rows


Rule = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def make_rule(rule: str, variant: str, k: int) -> tuple[Rule, Rule]:
    """(ours, published) callables of (x0, generator) -> noise for one row."""
    if rule == "knn":
        cfg = KNNAssigner(k=k)
        return (lambda x, g: pair(x, cfg, g)[1]), (lambda x, g: published_knn(x, k, g))
    cfg = LinearAssigner(cost="l2", quantize=variant)
    return (lambda x, g: pair(x, cfg, g)[1]), (lambda x, g: published_linear(x, g))


def images(batch: int, shape: tuple[int, ...], device: str) -> torch.Tensor:
    """Image-like data in [-1, 1] (smooth, std ~0.5): the distances then behave as in training."""
    g = torch.Generator(device="cpu").manual_seed(0)
    coarse = torch.randn(batch, shape[0], shape[1] // 4, shape[2] // 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    return (0.6 * x).clamp(-1, 1).to(device)


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so every timed CPU call starts from the same cold heap: how
    much of a call's memory is already faulted in would otherwise depend on the calls before it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def time_ms(fn: Rule, x: torch.Tensor, seed: int) -> float:
    g = torch.Generator(device=x.device).manual_seed(seed)
    if x.is_cuda:
        torch.cuda.synchronize()
    else:
        _malloc_trim()
    began = time.perf_counter()
    fn(x, g)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - began) * 1e3


def compare(ours: Rule, published: Rule, x: torch.Tensor, repeats: int,
            run_published: bool) -> tuple[float, float | None]:
    """Median ms of ours and of the published code, interleaved call by call after one warm-up each.

    At least `repeats` calls each (unless a cell is slower than CELL_SECONDS), and up to 10x more while the cell
    has taken under a quarter of that: cheap cells get enough calls for a stable median on a busy machine.
    """
    ours_ms, pub_ms = [time_ms(ours, x, 0)], [time_ms(published, x, 0)] if run_published else []
    if x.is_cuda or ours_ms[0] < 1e3 * CELL_SECONDS / 4:  # a warm-up run was cheap: discard it, time afresh
        ours_ms, pub_ms = [], []
    for rep in range(10 * repeats):
        spent = max(sum(ours_ms), sum(pub_ms))
        if spent > 1e3 * CELL_SECONDS or (rep >= repeats and spent > 1e3 * CELL_SECONDS / 4):
            break
        ours_ms.append(time_ms(ours, x, rep + 1))
        if run_published:
            pub_ms.append(time_ms(published, x, rep + 1))
    return statistics.median(ours_ms), (statistics.median(pub_ms) if pub_ms else None)


def cuda_peak_mib(ours: Rule, x: torch.Tensor) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    noise = ours(x, torch.Generator(device=x.device).manual_seed(0))
    peak = torch.cuda.max_memory_allocated(x.device) - base - noise.numel() * noise.element_size()
    return peak / 2**20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def cpu_peaks_child(rows: list) -> None:
    """Child process: our peak extra resident memory per row, as JSON on stdout."""
    out = {}
    for rule, variant, batch, shape, k in rows:
        ours, _ = make_rule(rule, variant, k)
        x = images(batch, SHAPES[shape], "cpu")
        ours(x[:2], torch.Generator().manual_seed(0))  # load kernels before measuring
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _status_bytes("VmRSS")
        noise = ours(x, torch.Generator().manual_seed(0))
        out[f"{rule}|{variant}|{batch}|{shape}"] = (_status_bytes("VmHWM") - base - noise.numel() * 4) / 2**20
        del noise
    print(json.dumps(out))


def cpu_peaks(rows: list) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, __file__, "--cpu-peaks-child", json.dumps(rows)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024


def planned_mib(batch: int, dim: int, k: int, budget_mib: float) -> float:
    """The most extra memory our KNN plans to hold (fp32), by its own accounting."""
    chunks = knn.plan_chunks(batch, dim, k, 4, budget_mib * 2**20)
    return max(knn.chunk_bytes(chunk, batch, dim, 4, carried=len(chunks) > 1) for chunk in chunks) / 2**20


def skip_reason(device: str, rule: str, batch: int, dim: int, k: int, free: int) -> str:
    need = published_bytes(rule, batch, dim, k)
    if need > free / 3:
        return f"published skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.0f} GiB free"
    if device == "cpu" and published_seconds(rule, batch, dim, k) > 30:
        return f"published skipped: ~{published_seconds(rule, batch, dim, k):.0f} s per call"
    return ""


def run(device: str, quick: bool, repeats: int) -> None:
    rows = cells(quick)
    peaks = cpu_peaks(rows) if device == "cpu" else {}
    free = available_bytes(device)
    budget = KNNAssigner().memory_budget_mib
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\n## {device} ({where}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}); "
          f"KNN memory budget {budget:g} MiB\n")
    print("| rule | variant | B | D | ours ms | published ms | ours/published | our peak MiB | planned MiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rule, variant, batch, shape, k in rows:
        dim = torch.Size(SHAPES[shape]).numel()
        note = skip_reason(device, rule, batch, dim, k, free)
        ours, published = make_rule(rule, variant, k)
        x = images(batch, SHAPES[shape], device)
        ours_ms, pub_ms = compare(ours, published, x, repeats, run_published=not note)
        peak = cuda_peak_mib(ours, x) if device == "cuda" else peaks[f"{rule}|{variant}|{batch}|{shape}"]
        planned = f"{planned_mib(batch, dim, k, budget):.0f}" if rule == "knn" else "-"
        published_text, ratio = (f"{pub_ms:.1f}", f"{ours_ms / pub_ms:.2f}") if pub_ms else ("-", "-")
        print(f"| {rule} | {variant} | {batch} | {shape} | {ours_ms:.1f} | {published_text} | {ratio} | "
              f"{peak:.0f} | {planned} | {note} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


SOLVER_BATCHES = (1024, 2048, 4096)


def solvers(batches: tuple[int, ...], repeats: int) -> None:
    """scipy vs LAPJV on the same costs: linear assignment's L2 cost of CIFAR-10-sized images (3x32x32) and noise,
    in fp32 and fp16-quantized (the papers' setting, with ties). Seconds per solve (median) and both totals."""
    try:
        import lap  # noqa: F401
    except ImportError:
        print("\n## solvers: the `lap` package is not installed (pip install 'immiscible[lapjv]'), skipped")
        return
    from immiscible_cli.assigners.linear import cost_matrix, solve

    print("\n## exact solvers: scipy linear_sum_assignment vs LAPJV (lap), cost on the CPU, D = 3x32x32")
    print(f"{'B':>6} {'cost':>6} {'scipy s':>9} {'lapjv s':>9} {'speed-up':>9}  same optimal cost")
    for batch in batches:
        x = images(batch, SHAPES["3x32x32"], "cpu").flatten(1)
        n = torch.randn(x.shape, generator=torch.Generator().manual_seed(batch))
        for quantize in ("none", "fp16"):
            cost, _, _ = cost_matrix(x, n, "l2", quantize)
            c = cost.double()
            times, totals = {}, {}
            for solver in ("scipy", "lapjv"):
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    order = solve(cost, solver)
                    runs.append(time.perf_counter() - start)
                times[solver] = statistics.median(runs)
                totals[solver] = c[torch.arange(batch), torch.from_numpy(order)].sum().item()
            same = abs(totals["scipy"] - totals["lapjv"]) <= 1e-9 * abs(totals["scipy"])
            print(f"{batch:>6} {quantize:>6} {times['scipy']:>9.3f} {times['lapjv']:>9.3f} "
                  f"{times['scipy'] / times['lapjv']:>8.1f}x  {same} ({totals['scipy']:.6f} vs {totals['lapjv']:.6f})")


def scores(device: str, repeats: int) -> None:
    """KNN's three scores (assigner.knn_score) on the same batches, interleaved: ms per call (median) and each
    score's time over l2's. `direction`/`centred` add a division per candidate and, for the stats, one distance."""
    print(f"\n## {device}: KNN scores, ms per call (median of {repeats}), ratio to l2")
    print(f"{'B':>6} {'D':>9} {'k':>4} {'l2':>9} {'direction':>10} {'centred':>9} {'dir/l2':>7} {'cen/l2':>7}")
    for batch, shape, k in ((128, "3x32x32", 8), (256, "3x32x32", 8), (1024, "3x32x32", 8), (128, "4x64x64", 64)):
        x = images(batch, SHAPES[shape], device)
        center = x.mean(dim=0)
        rules = {score: (lambda x_, g, s=score: pair(x_, KNNAssigner(k=k, knn_score=s), g, {}, center)[1])
                 for score in ("l2", "direction", "centred")}
        for rule in rules.values():  # warm-up
            time_ms(rule, x, 0)
        times: dict[str, list[float]] = {score: [] for score in rules}
        for repeat in range(repeats):
            for score, rule in rules.items():
                times[score].append(time_ms(rule, x, repeat))
        ms = {score: statistics.median(values) for score, values in times.items()}
        print(f"{batch:>6} {shape:>9} {k:>4} {ms['l2']:>9.2f} {ms['direction']:>10.2f} {ms['centred']:>9.2f} "
              f"{ms['direction'] / ms['l2']:>7.2f} {ms['centred'] / ms['l2']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="a subset: B in {128, 1024}, k in {4, 64}")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per cell, at least (more for cheap cells, fewer for slow ones)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--solvers", action="store_true",
                        help="only the exact solvers: scipy vs LAPJV at B = 1024, 2048, 4096")
    parser.add_argument("--scores", action="store_true", help="only KNN's scores: l2 vs direction vs centred")
    parser.add_argument("--cpu-peaks-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_peaks_child:
        return cpu_peaks_child(json.loads(args.cpu_peaks_child))
    if args.solvers:
        return solvers(SOLVER_BATCHES, max(1, min(args.repeats, 3)))
    if args.scores:
        for device in ["cpu", "cuda"] if args.device == "all" else [args.device]:
            if device == "cpu" or torch.cuda.is_available():
                with torch.no_grad():
                    scores(device, args.repeats)
        return
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("\n## cuda: not available, skipped")
            continue
        started = time.perf_counter()
        with torch.no_grad():
            run(device, args.quick, args.repeats)
        print(f"\n{device} table took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
