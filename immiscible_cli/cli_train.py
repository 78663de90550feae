"""The commands that make training runs and what they train on: `train` (one run), `study` (runs x seeds, then
their comparison) and `encode` (a preset's images into a latents file). Each parses and checks its options, makes
its library call and says where the results went; cli.py registers them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_support import (InceptionOpt, PresetOpt, SetOpt, command, err, examples, joins_process_group, on_rank0,
                          one_process, out, reports_user_errors)
from .config.fields import MAX_BATCH


@command(epilog=examples(
    "the quickstart preset: embedded Fashion-MNIST, small UNet, CPU-friendly, FID curve included",
    "immiscible train",
    "KNN noise selection on CIFAR-10 from a local copy",
    "immiscible train --preset cifar10-knn --set data.root=~/data/cifar10",
    "override fields (values are YAML)",
    "immiscible train --preset fmnist-knn --set train.total_kimg=2 --set assigner.k=4",
    "print the resolved config and the run directory, write nothing",
    "immiscible train --preset cifar10-knn --dry-run",
    "continue a run from its newest readable checkpoint",
    "immiscible train --resume runs/00003-cifar10-knn",
))
@reports_user_errors
@joins_process_group
def train(
    preset: PresetOpt = None,
    set_: SetOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder under which numbered run directories are made.")]
    = Path("runs"),
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Train into exactly this directory; if it "
                                                    "already holds the same run, continue it.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run directory with its own "
                                                   "config (--set may change train.total_kimg, eval.*, ...).")]
    = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the run directory, "
                                          "write nothing.")] = False,
    inception: InceptionOpt = None,
) -> None:
    """Train a model with the chosen noise assigner; ticks go to metrics.jsonl, FID points to fid.jsonl."""
    from . import train_setup

    # under torchrun rank 0 reads the config and the run directory, and tells every rank
    plan = on_rank0(lambda: train_setup.plan(preset, set_, out_dir=out_dir, run_dir=run_dir, resume=resume))
    if dry_run:
        out.print(plan.cfg.to_yaml(), end="", markup=False)
        out.print(f"# dry run: would {'continue' if plan.continues else 'create'} {plan.target} (nothing written)",
                  markup=False)
        return
    from .files import check_writable
    from .trainer import check_before_work

    check_before_work(plan.cfg)  # an optional solver or logger extra, a batch the processes cannot share
    option = "--resume" if resume is not None else "--run-dir" if run_dir is not None else "--out"
    on_rank0(lambda: check_writable(plan.target if option != "--out" else out_dir, "folder", option))  # before work
    run = train_setup.train_run(plan.cfg, out_dir=out_dir, run_dir=resume or run_dir, resume=resume is not None,
                                inception=inception, argv=sys.argv, console=out)
    out.print(f"run directory: {run.path}", markup=False)



@command(epilog=examples(
    "what would run, what is done, and how long the rest should take",
    "immiscible study studies/fmnist-cpu.yaml --dry-run",
    "run it (again after a crash or a kill: it continues where it stopped), then compare",
    "immiscible study studies/fmnist-cpu.yaml",
    "only rewrite the comparison and report from the runs there are",
    "immiscible study studies/fmnist-cpu.yaml --report-only",
))
@reports_user_errors
def study(
    file: Annotated[Path, typer.Argument(help="Study file (YAML): runs (preset + overrides), seeds, baseline.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Study folder (default: runs/study-NAME).")]
    = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List each run's state and the estimated time left; "
                                          "write nothing.")] = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="Write the comparison and report from the "
                                              "runs as they are; train nothing.")] = False,
    inception: InceptionOpt = None,
) -> None:
    """Run a study: every run x seed that is missing or unfinished, then the comparison table, plot and report."""
    one_process("study")
    from . import study as study_mod

    spec = study_mod.load_study(file)
    folder = out_dir or study_mod.default_out(spec)
    if dry_run:
        study_mod.print_status(spec, folder, out)
        return
    from .files import check_writable

    check_writable(folder, "folder", "--out" if out_dir else "study folder")  # before any run is trained
    report = study_mod.write_report(spec, folder) if report_only else \
        study_mod.run_study(spec, file, folder, console=out, inception=inception)
    out.print(f"report: {report}", markup=False)



@command(epilog=examples(
    "a folder of images at 256 px through Stable Diffusion's VAE (a local folder), for `latents-knn`",
    "immiscible encode --vae ~/models/sd-vae --preset cifar10-knn --set data.source=imagefolder "
    "--set data.root=/data/faces --set data.resolution=256 --out faces.safetensors",
    "run the same command again after a kill: it continues at the first chunk not written",
    "immiscible encode --vae ~/models/sd-vae --preset fmnist-knn --set data.resolution=256 --set data.fit=resize "
    "--out fm.safetensors",
))
@reports_user_errors
def encode(
    vae: Annotated[Path, typer.Option("--vae", help="Folder of a diffusers AutoencoderKL (config.json and "
                                      "weights); read locally, nothing is downloaded.")],
    out_file: Annotated[Path, typer.Option("--out", help="The latents file to write (.safetensors).")],
    preset: PresetOpt = None,
    set_: SetOpt = None,
    batch: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Images per VAE call and per chunk of the "
                                       "resumable encode.")] = 32,
    precision: Annotated[str, typer.Option(help="Storage of the latents: fp32 | fp16 (the VAE runs in fp32).")]
    = "fp32",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out, or an unfinished encode made "
                                        "with other settings.")] = False,
) -> None:
    """Encode a preset's images with a VAE into a latents file, for `data.source: latents` (the latents-knn
    preset); chunked, resumable by running it again."""
    one_process("encode")
    from . import encode as encode_mod
    from .console import Bars

    with Bars(err) as bars:
        header = encode_mod.encode(vae, preset, set_ or [], out_file, batch=batch, precision=precision,
                                   device=device, force=force, progress=bars)
    channels, side, _ = header.shape
    out.print(f"wrote {out_file}: {header.images} latents of {channels}x{side}x{side} ({header.precision}); train "
              f"on them with --set data.root={out_file} (data.channels={channels}, data.resolution={side})",
              markup=False)
