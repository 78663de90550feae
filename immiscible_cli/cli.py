"""The `immiscible` command line: parse, load the config, make one library call, say where results went.

Library modules are imported inside each command so that `immiscible --help` and config errors answer at once,
without importing torch first.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .cli_support import (SAMPLER_HELP, InceptionOpt, PresetOpt, SamplingSetOpt, SetOpt, VaeOpt, err, examples,
                          exit_now, fail, joins_process_group, on_rank0, one_process, other_rank, out,
                          reports_user_errors, several_processes)
from .config.schema import MAX_BATCH, MAX_FID_IMAGES, MAX_STEPS
from .errors import UserError, names_memory_field

ANALYZE_MAX = 100_000  # analyze: batches, held-out images, samples (each held in memory at once)

app = typer.Typer(
    name="immiscible",
    help="Train image diffusion and flow-matching models faster with immiscible noise assignment, "
         "watch FID fall, and compare runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
presets_app = typer.Typer(help="List the shipped presets, or show one fully resolved.", no_args_is_help=False,
                          add_completion=False, rich_markup_mode="rich")
app.add_typer(presets_app, name="presets")


# ------------------------------------------------------------------------------------------------------------------
# train


@app.command(epilog=examples(
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


# ------------------------------------------------------------------------------------------------------------------
# sample


@app.command(epilog=examples(
    "64 images from the newest checkpoint as one grid",
    "immiscible sample runs/00003-cifar10-knn --num 64 --grid grid.png",
    "1000 PNG files, seeds 0..999, 100 sampling steps",
    "immiscible sample runs/00003-cifar10-knn --seeds 0-999 --out samples/ --steps 100",
    "the snapshot at 2000 kimg, ancestral sampler, raw (non-EMA) weights",
    "immiscible sample runs/00004-fmnist-knn --ckpt 2000 --sampler ddpm --no-ema --num 16 --grid g.png",
    "in-paint the centre of photo.png 4 times (seeds 0..3); white = generate in a mask file",
    "immiscible sample runs/00003-cifar10-knn --inpaint --image photo.png --mask center --out edits/",
))
@reports_user_errors
def sample(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    ckpt: Annotated[str, typer.Option(help="`latest` or the kimg of a snapshot.")] = "latest",
    num: Annotated[Optional[int], typer.Option("--num", "-n", min=1, help="Number of images (seeds 0..N-1).")]
    = None,
    seeds: Annotated[Optional[str], typer.Option(help="Seed range A-B (inclusive) or list 1,5,9; one image "
                                                 "per seed.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, max=MAX_STEPS, help="Sampling steps (default: the run's "
                                                 "sample.steps).")]
    = None,
    sampler: Annotated[Optional[str], typer.Option(help=SAMPLER_HELP)]
    = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance weight (conditional runs).")]
    = None,
    class_: Annotated[Optional[int], typer.Option("--class", help="Class label for every image (conditional "
                                                  "runs; default: seed mod classes).")] = None,
    batch: Annotated[Optional[int], typer.Option(min=1, max=MAX_BATCH, help="Images per forward pass.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Write one PNG per image here, batch by batch.")]
    = None,
    grid: Annotated[Optional[Path], typer.Option(help="Write the images (the first 1024 at most) as one PNG grid; "
                                                 "a .png file.")] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    inpaint: Annotated[bool, typer.Option("--inpaint", help="Edit --image: generate the --mask region, keep the "
                                          "rest; --num/--seeds edits per image (default 4).")] = False,
    image: Annotated[Optional[Path], typer.Option(help="With --inpaint: an image file or a folder of them.")]
    = None,
    mask: Annotated[Optional[str], typer.Option(help="With --inpaint: center | left-half | outpaint-8px, or a PNG "
                                                "(white = generate, black = keep). Default: center.")] = None,
    resample: Annotated[int, typer.Option(min=0, help="With --inpaint: RePaint jumps back per step "
                                          "(0 = off).")] = 0,
    set_: SamplingSetOpt = None,
    vae: VaeOpt = None,
) -> None:
    """Generate images from a run's checkpoint; image i depends only on its seed, never on the batch size."""
    one_process("sample")
    from . import runs, sampling
    from .console import Bars
    from .files import check_writable

    if not inpaint:
        for given, option in ((image, "--image"), (mask, "--mask"), (resample or None, "--resample")):
            if given is not None:
                fail(f"{option} edits images: add --inpaint (with --image FILE_OR_FOLDER)")
    elif image is None:
        fail("--inpaint needs --image FILE_OR_FOLDER: the image(s) to edit")
    elif not (num or seeds):
        num = 4
    if out_dir is None and grid is None:
        fail("nothing to write: give --out DIR and/or --grid FILE.png")
    if grid is not None and grid.suffix.lower() != ".png":
        fail(f"--grid {grid}: the grid is written as PNG; give a file name ending in .png")
    chosen = sampling.parse_seeds(seeds, num)
    source = runs.open_run(run)
    for path, kind, option in ((grid, "file", "--grid"), (out_dir, "folder", "--out")):
        if path is not None:  # before any image is made
            check_writable(path, kind, option)
    if inpaint:
        from . import editing

        with Bars(err) as bars:
            written = editing.inpaint_run(source, ckpt=ckpt, image=image, mask="center" if mask is None else mask,
                                          seeds=chosen,
                                          steps=steps, sampler=sampler, guidance=guidance, label=class_,
                                          batch=batch, resample=resample, out_dir=out_dir, grid=grid, ema=ema,
                                          device=device, progress=bars, overrides=set_ or [])
        for path in written:
            out.print(f"wrote {path}", markup=False)
        return
    with Bars(err) as bars:
        written = sampling.sample_run(source, ckpt=ckpt, seeds=chosen, steps=steps, sampler=sampler,
                                      guidance=guidance, label=class_, batch=batch, out_dir=out_dir, grid=grid,
                                      ema=ema, device=device, progress=bars, overrides=set_ or [], vae=vae)
    for path in written:
        shown = f" (the first {sampling.GRID_MAX} of {len(chosen)} images)" \
            if path == grid and len(chosen) > sampling.GRID_MAX else ""
        out.print(f"wrote {path}{shown}", markup=False)


# ------------------------------------------------------------------------------------------------------------------
# eval


@app.command(name="eval", epilog=examples(
    "the newest run under runs/: every checkpoint not yet scored with these settings",
    "immiscible eval --fid",
    "the final checkpoint with 50k images (the papers' protocol)",
    "immiscible eval runs/00003-cifar10-knn --fid --num-images 50000 --ckpt latest",
    "two runs, curves as JSON",
    "immiscible eval runs/a runs/b --fid --json > curves.json",
    "a conditional run's last checkpoint again with guidance 2 (rows beside the run's own, settings recorded)",
    "immiscible eval runs/00005-fmnist-knn-cond --fid --ckpt latest --set sample.guidance=2",
))
@reports_user_errors
@joins_process_group
def eval_(
    runs_: Annotated[Optional[list[Path]], typer.Argument(metavar="[RUN]...", help="Run directories (default: "
                                                          "the newest under runs/).")] = None,
    fid: Annotated[bool, typer.Option("--fid", help="Compute FID (the metric this command computes).")] = False,
    kid: Annotated[bool, typer.Option("--kid", help="Also compute KID, stored in the same row.")] = False,
    num_images: Annotated[Optional[int], typer.Option(min=2, max=MAX_FID_IMAGES, help="Generated images per point "
                                                      "(default: the "
                                                      "run's eval.num_images).")] = None,
    ckpt: Annotated[Optional[list[str]], typer.Option(help="all | latest | KIMG (repeatable). Default: all.")]
    = None,
    steps: Annotated[Optional[int], typer.Option(min=1, max=MAX_STEPS, help="Sampling steps (default: "
                                                 "eval.steps).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Sampler (default: eval.sampler).")] = None,
    reference: Annotated[Optional[str], typer.Option(help="computed | cleanfid (default: eval.reference).")]
    = None,
    reference_images: Annotated[Optional[int], typer.Option(min=2, max=MAX_FID_IMAGES, help="Real images behind "
                                                            "computed reference "
                                                            "statistics (default: eval.reference_images).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="clean | legacy_tensorflow (default: eval.mode).")] = None,
    batch: Annotated[Optional[int], typer.Option(min=1, max=MAX_BATCH, help="Images per batch.")] = None,
    root: Annotated[Path, typer.Option(help="Where to look for the newest run when none is given.")]
    = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the curves as JSON on stdout.")] = False,
    inception: InceptionOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    set_: SamplingSetOpt = None,
    vae: VaeOpt = None,
) -> None:
    """Score a run's checkpoints with FID (clean-fid's pipeline).

    Checkpoints that already have a row with the same settings in fid.jsonl are skipped: re-running adds nothing,
    and an interrupted eval resumes where it stopped."""
    from . import evaluate, runs

    if not fid and not kid:
        fail("choose a metric: --fid (and optionally --kid)")
    targets = [runs.open_run(p) for p in runs_] if runs_ else [runs.latest_run(root)]
    with names_memory_field("--batch", batch or "the run's eval.batch_size", "while scoring FID"):
        result = evaluate.evaluate_runs(targets, ckpts=ckpt or ["all"], num_images=num_images, steps=steps,
                                        sampler=sampler, reference=reference, mode=mode, batch=batch, kid=kid,
                                        inception=inception, device=device,
                                        console=Console(quiet=True) if other_rank() else err,
                                        reference_images=reference_images, overrides=set_ or [], vae=vae)
    if other_rank():  # rank 0 reports
        return
    if as_json:
        print(evaluate.curves_json(result))
    else:
        evaluate.print_curves(result, out)


# ------------------------------------------------------------------------------------------------------------------
# encode


@app.command(epilog=examples(
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


# ------------------------------------------------------------------------------------------------------------------
# compare


@app.command(epilog=examples(
    "vanilla against KNN: table with best FID, kimg to the baseline's best FID, speed-up",
    "immiscible compare runs/00001-quickstart runs/00002-quickstart-knn",
    "a chosen baseline and target FID, plus a plot",
    "immiscible compare runs/a runs/b runs/c --baseline runs/a --target 30 --plot curves.png",
    "machine-readable",
    "immiscible compare runs/* --json > speedups.json",
    "the curves rescored with a smaller start noise (immiscible eval RUN --fid --set sample.start_std=0.98)",
    "immiscible compare runs/a runs/b --where sampling.start_std=0.98",
))
@reports_user_errors
def compare(
    runs_: Annotated[list[Path], typer.Argument(metavar="RUN RUN...", help="Two or more run directories.")],
    target: Annotated[Optional[float], typer.Option(help="FID to reach (default: the baseline's best FID).")]
    = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Baseline run (default: the first run given).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write FID-vs-kimg and FID-vs-time plots to this PNG.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print the table as CSV.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse runs whose FID settings differ.")] = False,
    where: Annotated[Optional[list[str]], typer.Option(
        "--where", metavar="FIELD=VALUE", help="Only FID points scored with this setting, as fid.jsonl names it "
        "(e.g. sampling.start_std=0.98, num_images=10000); repeatable.")] = None,
) -> None:
    """Compare FID curves: best and final FID, FID at shared kimg, kimg to a target FID and the speed-up."""
    from . import compare as compare_mod

    if as_json and as_csv:
        fail("choose one of --json and --csv")
    compare_mod.main(runs_, target=target, baseline=baseline, plot=plot, fmt="json" if as_json else
                     "csv" if as_csv else "table", strict=strict, out=out, err=err, where=where or [])


# ------------------------------------------------------------------------------------------------------------------
# study


@app.command(epilog=examples(
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


# ------------------------------------------------------------------------------------------------------------------
# analyze


@app.command(epilog=examples(
    "data mode: KNN against vanilla pairing on the preset's own batches, no training",
    "immiscible analyze --preset fmnist-knn",
    "several presets, fewer batches, chosen noise levels",
    "immiscible analyze --preset fmnist-vanilla --preset fmnist-knn --batches 20 --levels 0.5,0.9",
    "run mode: loss per noise level, bijectivity and diversity of a trained run",
    "immiscible analyze runs/00003-fmnist-knn --ckpt 1280 --samples 32",
))
@reports_user_errors
def analyze(
    runs_: Annotated[Optional[list[Path]], typer.Argument(metavar="[RUN]...", help="Run directories (run mode); "
                                                          "or give --preset instead.")] = None,
    preset: Annotated[Optional[list[str]], typer.Option("--preset", "-p", help="Preset name or YAML file (data "
                                                        "mode); repeatable.")] = None,
    set_: SetOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: analysis/NAME here, "
                                                    "or beside the first run).")] = None,
    batches: Annotated[int, typer.Option(min=2, max=ANALYZE_MAX, help="Data mode: batches of train.batch_size "
                                         "images.")] = 100,
    levels: Annotated[Optional[str], typer.Option(help="Data mode: noise levels in (0, 1], comma list (0 = clean, "
                                                  "1 = pure noise; DDPM t = level x T). Default: 0.1,0.2,...,1.")]
    = None,
    ckpt: Annotated[str, typer.Option(help="Run mode: `latest` or the kimg of a snapshot.")] = "latest",
    images: Annotated[int, typer.Option(min=1, max=ANALYZE_MAX, help="Run mode: held-out images for the loss per "
                                        "bin.")] = 512,
    bins: Annotated[int, typer.Option(min=1, max=1000, help="Run mode: noise-level bins of the loss.")] = 10,
    samples: Annotated[int, typer.Option(min=2, max=ANALYZE_MAX, help="Run mode: samples for bijectivity and "
                                         "diversity.")] = 64,
    steps: Annotated[Optional[int], typer.Option(min=1, max=MAX_STEPS, help="Run mode: sampling steps (default: "
                                                 "the run's "
                                                 "sample.steps).")] = None,
    no_inception: Annotated[bool, typer.Option("--no-inception", help="Run mode: skip the Inception feature "
                                               "distances.")] = False,
    inception: InceptionOpt = None,
    device: Annotated[str, typer.Option(help="Run mode: auto | cpu | cuda")] = "auto",
) -> None:
    """Measure why pairing works: trajectory separation, irreducible loss and noise statistics of presets (data
    mode), or loss per noise level, bijectivity and diversity of trained runs (run mode)."""
    one_process("analyze")
    if runs_ and preset:
        fail("give run directories (run mode) or --preset (data mode), not both")
    if not runs_ and not preset:
        fail("nothing to analyze: give run directories (run mode) or --preset NAME (data mode)")
    from . import analysis

    if preset:
        from .analysis.levels import parse_levels
        from .config import load_config

        configs = [load_config(name, set_ or []) for name in preset]
        settings = analysis.DataSettings(batches=batches, levels=parse_levels(levels))
        folder = analysis.analyze_presets(configs, settings, out_dir, out)
    else:
        from . import runs

        if set_:
            fail("--set changes presets (data mode); a run is analysed with its own config")
        targets = [runs.open_run(path) for path in runs_]
        settings = analysis.RunSettings(ckpt=ckpt, images=images, bins=bins, samples=samples, steps=steps,
                                        device=device, inception=inception, use_inception=not no_inception)
        folder = analysis.analyze_runs(targets, settings, out_dir, out)
    out.print(f"results: {folder}", markup=False)


# ------------------------------------------------------------------------------------------------------------------
# presets


@presets_app.callback(invoke_without_command=True, epilog=examples(
    "every preset with its one-line description", "immiscible presets",
    "one preset with every field resolved", "immiscible presets show cifar10-knn",
))
def presets_list(ctx: typer.Context) -> None:
    """List every shipped preset with a one-line description."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from .config import list_presets

    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("preset")
    table.add_column("description")
    for name, description in list_presets().items():
        table.add_row(name, description)
    out.print(table)


@presets_app.command("show", epilog=examples("a shipped preset", "immiscible presets show quickstart",
                                             "your own file", "immiscible presets show ./my-preset.yaml"))
@reports_user_errors
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or path to a YAML file.")]) -> None:
    """Print a preset fully resolved (every field, defaults included) as YAML."""
    from .config import load_config

    out.print(load_config(name).to_yaml(), end="", markup=False)


def main() -> None:
    """The console script. Under torchrun (several processes) the process ends with os._exit once the command has
    left the process group and flushed its output: the interpreter's own teardown then runs no C++ destructors,
    one of which (a thread object of torch.distributed still joinable at exit) aborted rank 0 about once in eight
    finished runs ("terminate called without an active exception", SIGABRT, so torchrun reported a finished run as
    FAILED). The exit code is the command's."""
    if not several_processes():
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as e:  # typer ends every command with one
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    exit_now(code)
