"""`immiscible sample`: `--seeds` parsing, a run's config and network checked for sampling, PNG files and grids
written batch by batch. The images themselves come from generation.py (image i from seed i alone).
"""

from __future__ import annotations

import math
import itertools
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .config import SAMPLING_OVERRIDES, Config, check_sampler, check_steps, with_overrides
from .console import Progress
from .errors import UserError, names_memory_field
from .generation import generate
from .images import grid_image, save_each, save_png
from .latents import run_decoder
from .networks import load_network, pick_device
from .vae import attach
from .runs import Run


GRID_MAX = 1024  # a --grid shows at most the first GRID_MAX images


class SeedRanges(Sequence[int]):
    """The seeds of `--seeds`/`--num` kept as ranges: `--seeds 0-999999999999` costs a few bytes, not a list of
    10^12 ints. Compares equal to any sequence of the same seeds."""

    def __init__(self, ranges: list[range]):
        self.ranges = ranges  # each with step 1
        self.length = sum(r.stop - r.start for r in ranges)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self.ranges)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(itertools.islice(self, *index.indices(self.length)))
        index += self.length if index < 0 else 0
        for r in self.ranges:
            if 0 <= index < r.stop - r.start:
                return r.start + index
            index -= r.stop - r.start
        raise IndexError("seed index out of range")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and len(self) == len(other) \
            and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SeedRanges({self.ranges!r})"


def parse_seeds(seeds: str | None, num: int | None) -> SeedRanges:
    """`--seeds 0-63`, `--seeds 1,5,9` or `--num 64` (seeds 0..63) -> the seeds, as ranges (nothing is listed)."""
    if seeds and num:
        raise UserError("give --num or --seeds, not both")
    if not seeds:
        if num is not None and num > sys.maxsize:
            raise UserError(f"--num {num}: at most {sys.maxsize} images; give a smaller number")
        return SeedRanges([range(num or 64)])
    result = []
    try:
        for part in seeds.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                result.append(range(lo, hi + 1))
            else:
                result.append(range(int(part), int(part) + 1))
    except ValueError:
        raise UserError(f"--seeds {seeds}: expected a range A-B (A <= B) or a list like 1,5,9") from None
    if any(not (0 <= r.start and r.stop <= 2**64) for r in result):
        raise UserError(f"--seeds {seeds}: seeds must be in 0..2^64-1")
    chosen = SeedRanges(result)
    if len(chosen) > sys.maxsize:
        raise UserError(f"--seeds {seeds}: more than {sys.maxsize} images; give a smaller range")
    return chosen


def sample_batches(net: torch.nn.Module, cfg: Config, seeds: Iterable[int], *, batch: int, label: int | None = None,
                   **options: Any) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(seeds, uint8 [b, C, H, W] images) for `batch` seeds at a time, each batch made only when asked for, so
    memory holds one batch however many seeds there are; image i is `generate`'s (options: sampler, steps, ...)."""
    pending = iter(seeds)
    while chunk := list(itertools.islice(pending, batch)):
        yield chunk, generate(net, cfg, chunk, labels=None if label is None else [label] * len(chunk), batch=batch,
                              **options)


def sampling_config(run: Run, overrides: Sequence[str] = ()) -> Config:
    """The run's config with `--set` overrides of how images are drawn (SAMPLING_OVERRIDES: `sample.*`, `eval.*`),
    validated; anything that would change the trained network is a ConfigError naming the override."""
    cfg = run.config()
    if not overrides:
        return cfg
    changed = with_overrides(cfg, list(overrides), SAMPLING_OVERRIDES, "when sampling a trained run")
    if changed.sample.guidance != cfg.sample.guidance:
        _check_guidance_applies(cfg, changed.sample.guidance, "--set sample.guidance=")
    return changed


def _check_guidance_applies(cfg: Config, weight: float, option: str) -> None:
    """A guidance weight other than the run's own (`--guidance`, `--set sample.guidance`) needs a conditional run."""
    if cfg.model.num_classes is None:
        raise UserError(f"{option}{weight:g}: this run is unconditional (model.num_classes is not set), so guidance "
                        f"would change nothing; drop it")


def load_for_sampling(run: Run, *, ckpt: str, ema: bool, device: str, sampler: str | None, steps: int | None,
                      guidance: float | None, label: int | None, overrides: Sequence[str] = (),
                      vae: Path | None = None) -> tuple[torch.nn.Module, Config, str, torch.device]:
    """`sample`'s options checked against the run, and its network: (net, config with `overrides`, sampler,
    device). A latent run's network carries its VAE (the recorded one, or `vae`, checked by sha256)."""
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"--guidance {guidance}: expected a finite weight >= 0 (1 = no guidance)")
    cfg = sampling_config(run, overrides)  # a bad --set fails before the network is read
    if guidance is not None and guidance != 1:
        _check_guidance_applies(cfg, guidance, "--guidance ")
    torch_device = pick_device(device)
    decoder = run_decoder(run, cfg, vae, torch_device)  # a missing or changed VAE fails before the network is read
    net, _, _, _ = load_network(run, ckpt, ema, torch_device)
    attach(net, decoder)
    sampler = sampler or cfg.sample.sampler
    check_sampler(cfg.objective.kind, sampler)
    if steps is not None:
        check_steps(cfg, steps)
    if label is not None and (cfg.model.num_classes is None or not 0 <= label < cfg.model.num_classes):
        raise UserError(f"--class {label}: " + ("this run is unconditional" if cfg.model.num_classes is None
                        else f"expected 0..{cfg.model.num_classes - 1}"))
    return net, cfg, sampler, torch_device


def sample_run(run: Run, *, ckpt: str, seeds: Sequence[int], steps: int | None, sampler: str | None,
               guidance: float | None, label: int | None, batch: int | None, out_dir: Path | None,
               grid: Path | None, ema: bool, device: str, progress: Progress | None = None,
               overrides: Sequence[str] = (), vae: Path | None = None) -> list[Path]:
    """`immiscible sample`: images from a run's snapshot as PNG files (written batch by batch, as they come) and/or
    one grid of the first GRID_MAX (only those are made without `out_dir`); returns what it wrote."""
    net, cfg, sampler, torch_device = load_for_sampling(run, ckpt=ckpt, ema=ema, device=device, sampler=sampler,
                                                        steps=steps, guidance=guidance, label=label,
                                                        overrides=overrides, vae=vae)
    count = len(seeds) if out_dir is not None else min(len(seeds), GRID_MAX)
    shown, kept, done = min(count, GRID_MAX) if grid is not None else 0, [], 0
    batches = sample_batches(net, cfg, itertools.islice(seeds, count), batch=batch or cfg.sample.batch_size,
                             label=label, sampler=sampler, steps=steps or cfg.sample.steps,
                             guidance=cfg.sample.guidance if guidance is None else guidance, device=torch_device)
    now = batch or f"{cfg.sample.batch_size}, the run's sample.batch_size"
    with names_memory_field("--batch", now, "while sampling"):
        for chunk, images in batches:
            if out_dir is not None:
                save_each(images, [f"seed{seed:06d}.png" for seed in chunk], Path(out_dir))
            if done < shown:
                kept.append(images[:shown - done])
                if done + len(kept[-1]) == shown:  # the grid is complete: write it now, keep no more images
                    save_png(grid_image(torch.cat(kept)), Path(grid))
                    kept = []
            done += len(chunk)
            if progress is not None:
                progress(done, count, "sample")
    return [Path(p) for p in (out_dir, grid) if p is not None]
