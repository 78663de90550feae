"""FID points: generate with fixed per-image seeds, score against reference statistics, append to fid.jsonl.

`FIDScorer` is shared by the trainer (a point every eval.every_kimg, from the EMA weights in memory) and by
`immiscible eval` (any checkpoint, afterwards). Every row carries the settings that make two FIDs comparable
(runs.FID_SETTINGS): mode, image count, reference statistics, sampler, steps, guidance, EMA, weights.
`eval` skips a checkpoint that already has a row with the same settings, so it is idempotent and resumable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import checkpoint, runs
from .config import Config, ConfigError, check_sampler
from .console import show_table
from .data import load_images
from .metrics import (FIDExtractor, ReferenceKey, cleanfid_reference, compute_kid, feature_stats,
                      frechet_distance, reference_stats)
from .sampling import generate, load_network, pick_device

Progress_ = Callable[[int, int, str], None]
REFERENCE_SEED = 0  # the subset of real images behind `eval.reference_images` is a fixed seeded draw


class FIDScorer:
    """FID of a network of one run config against that config's reference statistics."""

    def __init__(self, cfg: Config, device: torch.device, *, inception: Path | str | None = None,
                 console: Console | None = None, num_images: int | None = None, sampler: str | None = None,
                 steps: int | None = None, reference: str | None = None, mode: str | None = None,
                 batch: int | None = None, kid: bool = False, extractor: FIDExtractor | None = None,
                 reference_images: int | None = None):
        e = cfg.eval
        self.cfg, self.device, self.kid = cfg, device, kid
        self.num_images = num_images or e.num_images
        self.sampler, self.steps = sampler or e.sampler, steps or e.steps
        self.reference, self.mode = reference or e.reference, mode or e.mode
        self.batch = batch or e.batch_size
        self.reference_images = reference_images or e.reference_images
        check_sampler(cfg.objective.kind, self.sampler)
        if self.reference not in ("computed", "cleanfid"):
            raise ConfigError(f"reference '{self.reference}': expected computed or cleanfid")
        if kid and self.reference == "cleanfid":
            raise ConfigError("--kid: needs the reference images, which clean-fid's published statistics do not "
                              "include; use --reference computed")
        self.extractor = extractor or FIDExtractor(self.mode, device, weights=inception, batch_size=self.batch)
        self._real_batches: Callable | None = None  # the reference images, kept for KID
        self._real_features = None
        if self.extractor.mode != self.mode:
            raise ConfigError(f"mode '{self.mode}': expected one of clean, legacy_tensorflow")
        self.ref_mu, self.ref_sigma, self.ref_info = self._reference(console)

    def _reference(self, console: Console | None):
        data, e = self.cfg.data, self.cfg.eval
        if self.reference == "cleanfid":
            if data.source != "cifar10" or data.resolution != 32:
                raise ConfigError("eval.reference: clean-fid's published statistics exist for CIFAR-10 at 32 px "
                                  "only; use eval.reference=computed")
            mu, sigma = cleanfid_reference(e.reference_split, self.mode)
            count = 50_000 if e.reference_split == "train" else 10_000
            return mu, sigma, {"name": "cleanfid-cifar10", "split": e.reference_split, "num_images": count,
                               "mode": self.mode}
        split = e.reference_split
        if data.source in ("embedded", "imagefolder") and split != "train":
            raise ConfigError(f"eval.reference_split: the {data.source} source has one split; use train")
        real = load_images(data.model_copy(update={"max_images": None}), split)  # the whole split, not a subset
        total = len(real)
        count = min(self.reference_images or total, total)
        key = ReferenceKey.for_extractor(real.name, split, data.resolution, count, self.extractor)

        def images():
            chosen = real.images
            if count < total:
                pick = torch.randperm(total, generator=torch.Generator().manual_seed(REFERENCE_SEED))[:count]
                chosen = chosen[pick.sort().values]
            return chosen.split(self.batch)

        self._real_batches = images
        with _progress(console, "reference statistics", count) as advance:
            mu, sigma = reference_stats(key, images, self.extractor, progress=advance)
        return mu, sigma, {"name": real.name, "split": split, "num_images": count, "mode": self.mode,
                           "resolution": data.resolution, "file": key.filename()}

    def settings(self, ema: bool = True) -> dict[str, Any]:
        """The part of a row that must match for FIDs to be comparable (runs.FID_SETTINGS)."""
        w = self.extractor.weights
        return {"num_images": self.num_images, "mode": self.mode, "reference": self.ref_info,
                "sampler": self.sampler, "steps": self.steps, "guidance": self.cfg.sample.guidance, "ema": ema,
                "weights": {"source": w.source, "sha256": w.sha256, "dtype": w.dtype}}

    def score(self, net: torch.nn.Module, *, kimg: float, step: int, train_s: float, ema: bool = True,
              progress: Progress_ | None = None) -> dict[str, Any]:
        """Generate num_images (seeds 0..N-1) with `net`, score them; the fid.jsonl row."""
        start = time.perf_counter()
        was_training = net.training
        net.eval()
        images = []
        for first in range(0, self.num_images, self.batch):
            seeds = list(range(first, min(first + self.batch, self.num_images)))
            images.append(generate(net, self.cfg, seeds, sampler=self.sampler, steps=self.steps,
                                   guidance=self.cfg.sample.guidance, batch=self.batch, device=self.device))
            if progress:
                progress(seeds[-1] + 1, self.num_images, "FID sampling")
        net.train(was_training)
        features = self.extractor.features(
            images, (lambda done: progress(done, self.num_images, "FID features")) if progress else None)
        fid = frechet_distance(*feature_stats(features), self.ref_mu, self.ref_sigma)
        row = {"kimg": round(kimg, 6), "step": step, "fid": fid, **self.settings(ema)}
        if self.kid:
            row["kid"] = self._kid(features)
        return {**row, "seconds": time.perf_counter() - start, "train_s": train_s, "time": time.time()}

    def _kid(self, features) -> float:
        """KID needs the reference features themselves, not just (mu, sigma): computed once per scorer."""
        if self._real_features is None:
            self._real_features = self.extractor.features(self._real_batches())
        return compute_kid(features, self._real_features)


class _progress:
    """A rich progress bar on a terminal console; `advance(done)` callback; silent elsewhere."""

    def __init__(self, console: Console | None, what: str, total: int):
        self.console, self.what, self.total = console, what, total
        self.bar = None

    def __enter__(self) -> Callable[[int], None]:
        if self.console is not None and self.console.is_terminal:
            self.bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            task = self.bar.add_task(self.what, total=self.total)
            return lambda done: self.bar.update(task, completed=done)
        return lambda done: None

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------------------------------------------------------------------
# immiscible eval


def select_checkpoints(run: runs.Run, specs: list[str]) -> list[runs.Checkpoint]:
    if "all" in specs:
        return run.checkpoints()
    chosen = {c.path: c for c in (checkpoint.select(run, spec) for spec in specs)}  # a checkpoint named twice once
    return sorted(chosen.values(), key=lambda c: c.kimg)


def evaluate_runs(targets: list[runs.Run], *, ckpts: list[str], num_images: int | None, steps: int | None,
                  sampler: str | None, reference: str | None, mode: str | None, batch: int | None, kid: bool,
                  inception: Path | None, device: str, console: Console,
                  reference_images: int | None = None) -> list[dict[str, Any]]:
    """Score every selected checkpoint that has no row with the same settings yet; the curves per run."""
    torch_device = pick_device(device)
    extractors: dict[str, FIDExtractor] = {}
    results = []
    for run in targets:
        cfg = run.config()
        chosen_mode = mode or cfg.eval.mode
        if chosen_mode not in extractors:
            extractors[chosen_mode] = FIDExtractor(chosen_mode, torch_device, weights=inception,
                                                   batch_size=batch or cfg.eval.batch_size)
        scorer = FIDScorer(cfg, torch_device, console=console, num_images=num_images, sampler=sampler,
                           steps=steps, reference=reference, mode=chosen_mode, batch=batch, kid=kid,
                           extractor=extractors[chosen_mode], reference_images=reference_images)
        wanted = json.dumps(scorer.settings(), sort_keys=True)

        def matches(row: dict[str, Any]) -> bool:
            return json.dumps(runs.fid_settings(row), sort_keys=True) == wanted and (not kid or "kid" in row)

        selected = select_checkpoints(run, ckpts)
        scored = [r["kimg"] for r in run.fid_curve() if matches(r)]
        todo = [c for c in selected if not any(abs(kimg - c.kimg) < 5e-4 for kimg in scored)]
        console.print(f"{run.path}: {len(selected)} checkpoint(s) selected, {len(selected) - len(todo)} already "
                      f"scored with these settings, {len(todo)} to score", markup=False)
        for ckpt in todo:
            net, _, _, state = load_network(run, ckpt, True, torch_device)
            with _progress(console, f"{run.name} @ {ckpt.kimg:g} kimg", 2 * scorer.num_images) as advance:
                row = scorer.score(net, kimg=ckpt.kimg, step=int(state["step"]), train_s=float(state["train_s"]),
                                   progress=lambda done, total, what: advance(
                                       done + (total if what == "FID features" else 0)))
            run.append_fid(row)  # one row at a time: an interrupted eval keeps what it finished
            console.print(f"{run.name}: {ckpt.kimg:g} kimg  FID {row['fid']:.3f}", markup=False)
        curve = sorted((r for r in run.fid_curve() if matches(r)), key=lambda r: r["kimg"])
        results.append({"run": str(run.path), "curve": curve})
    return results


def curves_json(results: list[dict[str, Any]]) -> str:
    return json.dumps({"runs": results}, indent=2)


def print_curves(results: list[dict[str, Any]], console: Console) -> None:
    for result in results:
        has_kid = any("kid" in row for row in result["curve"])
        table = Table(title=result["run"], title_justify="left", header_style="bold")
        columns = ["kimg", "FID", *(["KID"] if has_kid else []), "images", "mode", "reference", "sampler", "steps",
                   "weights"]
        for column in columns:
            table.add_column(column, justify="right" if column in ("kimg", "FID", "KID", "images", "steps")
                             else "left")
        for row in result["curve"]:
            ref, weights = row["reference"], row["weights"]
            table.add_row(f"{row['kimg']:g}", f"{row['fid']:.3f}",
                          *([f"{row['kid']:.5f}" if "kid" in row else ""] if has_kid else []),
                          str(row["num_images"]), row["mode"], f"{ref['name']}/{ref['split']} n={ref['num_images']}",
                          row["sampler"], str(row["steps"]),
                          f"{weights['source']} {weights['sha256'][:8]} {weights['dtype']}")
        show_table(console, table)
