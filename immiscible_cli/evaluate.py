"""`immiscible eval`: FID points for a run's checkpoints after training, idempotent and resumable.

A checkpoint that already has a fid.jsonl row with the same settings (runs.FID_SETTINGS) is skipped, so
re-running adds nothing and an interrupted eval continues where it stopped.

An eval with checkpoints to score holds the run's lock (train.lock) while it scores and appends, and reads fid.jsonl
again once it holds it: an eval of a run that is being trained or evaluated is refused at once with one line naming
the pid (it does not wait: a training run can take days), and two evals never write one row twice. An eval with
nothing to score only reads, and works beside a trainer.

Under torchrun every rank reads the runs (a single node, or a shared file system) and makes its share of each
point's images (metrics/shards.py); rank 0 alone holds the lock, chooses the checkpoints and writes the rows.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.table import Table

from . import checkpoint, distributed, runs
from .config import Config, check_steps
from .console import Bars, show_table
from .errors import UserError
from .files import check_writable
from .latents import run_decoder, run_header
from .metrics import FIDExtractor
from .metrics.scorer import FIDScorer, inception_precision
from .runs import append_fid_row, fid_settings, read_fid_rows
from .networks import load_network, pick_device
from .sampling import sampling_config
from .vae import attach


# ------------------------------------------------------------------------------------------------------------------
# immiscible eval


def select_checkpoints(run: runs.Run, specs: list[str]) -> list[checkpoint.Checkpoint]:
    if "all" in specs:
        return checkpoint.weights(run)
    chosen = {c.path: c for c in (checkpoint.select(run, spec) for spec in specs)}  # a checkpoint named twice once
    return sorted(chosen.values(), key=lambda c: c.kimg)


def _surely_due(run: runs.Run, specs: list[str]) -> bool:
    """Whether a selected checkpoint of the run has no fid.jsonl row at its kimg at all (so a point is due whatever
    the settings); cheap, read before any FID network is built."""
    scored = [r["kimg"] for r in read_fid_rows(run)]
    return any(not any(abs(kimg - c.kimg) < 5e-4 for kimg in scored) for c in select_checkpoints(run, specs))


def _check_outputs(targets: list[runs.Run], ckpts: list[str]) -> dict[Path, UserError]:
    """What fails before any work: each run's fid.jsonl must take rows (a read-only or full disk fails before any
    scoring) and be the run's own file, not a symlink out of it; each --ckpt must parse. Returns the runs whose
    fid.jsonl takes no rows but may need none (already scored): an error only once a point turns out due."""
    unwritable: dict[Path, UserError] = {}
    for run in targets:
        run.check_files()
        try:
            check_writable(run.fid_path(), "file", append=True)
        except UserError as e:  # a run already scored is read, not written: fine read-only. Fail now, before the
            if _surely_due(run, ckpts):  # FID network and statistics are loaded, when a checkpoint has no row
                raise
            unwritable[run.path] = e  # else once its settings say whether a point is due
    for spec in ckpts:  # before any reference statistics are computed
        if spec != "all":
            checkpoint.parse_spec(spec)
    return unwritable


def _scorer(run: runs.Run, cfg: Config, device: torch.device, extractors: dict[tuple[str, str], FIDExtractor],
            console: Console, *, mode: str | None, batch: int | None, inception: Path | None,
            **options: Any) -> FIDScorer:
    """The FID scorer of one run, sharing one Inception network per mode and precision through `extractors`."""
    chosen_mode = mode or cfg.eval.mode
    key = (chosen_mode, inception_precision(cfg.eval.inception_precision, device))
    if key not in extractors:
        extractors[key] = FIDExtractor(chosen_mode, device, weights=inception,
                                       batch_size=batch or cfg.eval.batch_size, precision=key[1])
    with Bars(console) as bars:
        return FIDScorer(cfg, device, progress=bars, mode=chosen_mode, batch=batch, extractor=extractors[key],
                         latent=run_header(run, cfg), **options)


def evaluate_runs(targets: list[runs.Run], *, ckpts: list[str], num_images: int | None, steps: int | None,
                  sampler: str | None, reference: str | None, mode: str | None, batch: int | None, kid: bool,
                  inception: Path | None, device: str, console: Console,
                  reference_images: int | None = None, overrides: Sequence[str] = (),
                  vae: Path | None = None) -> list[dict[str, Any]]:
    """Score every selected checkpoint that has no row with the same settings yet; the curves per run.
    A latent run's images are decoded by its recorded VAE (or `vae`, `--vae`; checked by sha256).

    `overrides`: `--set` of sampling and FID fields (SAMPLING_OVERRIDES, e.g. `sample.start_std=0.98`), applied to
    every run's config; the rows record them, so such a point sits beside the run's own and is compared only with
    points scored the same way."""
    configs = [sampling_config(run, overrides) for run in targets]  # a bad --set fails before any work
    unwritable = _check_outputs(targets, ckpts)
    torch_device = pick_device(device)
    decoders = [run_decoder(run, cfg, vae, torch_device) for run, cfg in zip(targets, configs)]  # latent runs'
    # VAEs: a missing or changed one fails before any scoring
    extractors: dict[tuple[str, str], FIDExtractor] = {}  # one Inception network per mode and precision
    results = []
    for run, cfg, decoder in zip(targets, configs, decoders):
        if steps is not None:
            check_steps(cfg, steps)
        scorer = _scorer(run, cfg, torch_device, extractors, console, num_images=num_images, sampler=sampler,
                         steps=steps, reference=reference, mode=mode, batch=batch, kid=kid, inception=inception,
                         reference_images=reference_images)
        wanted = json.dumps(scorer.settings(), sort_keys=True)

        def matches(row: dict[str, Any]) -> bool:
            return json.dumps(fid_settings(row), sort_keys=True) == wanted and (not kid or "kid" in row)

        def unscored(rows: list[dict[str, Any]]) -> list[checkpoint.Checkpoint]:
            scored = [r["kimg"] for r in rows if matches(r)]
            return [c for c in selected if not any(abs(kimg - c.kimg) < 5e-4 for kimg in scored)]

        selected = select_checkpoints(run, ckpts)
        rows = read_fid_rows(run)
        writes = bool(unscored(rows))
        if writes and run.path in unwritable:
            raise unwritable[run.path]
        with distributed.main_context(lambda: run.lock("evaluated") if writes else contextlib.nullcontext()):
            if writes:  # read again under the lock: rows another eval wrote meanwhile are not scored twice
                rows = read_fid_rows(run)
            todo = distributed.on_main(lambda: unscored(rows))  # several processes: all score rank 0's list
            console.print(f"{run.path}: {len(selected)} checkpoint(s) selected, {len(selected) - len(todo)} already "
                          f"scored with these settings, {len(todo)} to score", markup=False)
            for ckpt in todo:
                net, _, _, state = load_network(run, ckpt, True, torch_device)
                attach(net, decoder)
                with Bars(console) as bars:
                    row = scorer.score(net, kimg=ckpt.kimg, step=int(state["step"]),
                                       train_s=float(state["train_s"]), progress=lambda done, total, _:
                                       bars(done, total, f"{run.name} @ {ckpt.kimg:g}"))
                distributed.on_main(lambda: append_fid_row(run, row))  # one row at a time: an interrupted eval
                # keeps what it finished; with several processes rank 0 alone writes
                rows.append(row)
                console.print(f"{run.name}: {ckpt.kimg:g} kimg  FID {row['fid']:.3f}", markup=False)
        curve = sorted((r for r in rows if matches(r)), key=lambda r: r["kimg"])
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
