"""The commands that measure runs: `eval` (FID points of a run's checkpoints into fid.jsonl), `compare` (FID
curves side by side: speed-ups, tables, plots) and `analyze` (why pairing works, on a preset's data or a trained
run). Each parses and checks its options, makes its library call and reports; cli.py registers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .cli_support import (InceptionOpt, SamplingSetOpt, SetOpt, VaeOpt, command, err, examples, fail,
                          joins_process_group, one_process, other_rank, out, reports_user_errors)
from .config.fields import MAX_BATCH, MAX_FID_IMAGES, MAX_STEPS
from .errors import names_memory_field

ANALYZE_MAX = 100_000  # analyze: batches, held-out images, samples (each held in memory at once)


@command(name="eval", epilog=examples(
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



@command(epilog=examples(
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



@command(epilog=examples(
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
