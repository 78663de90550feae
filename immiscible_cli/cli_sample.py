"""The `sample` command: images from a run's checkpoint (PNG files and/or one grid), or in-painted edits of given
images with `--inpaint`. It checks its options and the outputs before any image is made, then calls
`sampling.sample_run` or `editing.inpaint_run`; cli.py registers it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .cli_support import (SAMPLER_HELP, SamplingSetOpt, VaeOpt, command, err, examples, fail, one_process, out,
                          reports_user_errors)
from .config.fields import MAX_BATCH, MAX_STEPS

if TYPE_CHECKING:
    from .runs import Run


@command(epilog=examples(
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
    from .files import check_writable

    num = _edits_per_image(inpaint, image, mask, resample, num, seeds)
    if out_dir is None and grid is None:
        fail("nothing to write: give --out DIR and/or --grid FILE.png")
    if grid is not None and grid.suffix.lower() != ".png":
        fail(f"--grid {grid}: the grid is written as PNG; give a file name ending in .png")
    chosen = sampling.parse_seeds(seeds, num)
    source = runs.open_run(run)
    for path, kind, option in ((grid, "file", "--grid"), (out_dir, "folder", "--out")):
        if path is not None:  # before any image is made
            check_writable(path, kind, option)
    options = dict(ckpt=ckpt, seeds=chosen, steps=steps, sampler=sampler, guidance=guidance, label=class_,
                   batch=batch, out_dir=out_dir, grid=grid, ema=ema, device=device, overrides=set_ or [])
    if inpaint:
        _inpaint(source, image, "center" if mask is None else mask, resample, options)
    else:
        _generate(source, vae, options)


def _edits_per_image(inpaint: bool, image: Optional[Path], mask: Optional[str], resample: int, num: Optional[int],
                     seeds: Optional[str]) -> Optional[int]:
    """--num as `sample` takes it: the in-painting options only with --inpaint, which needs --image and makes 4
    edits per image unless --num or --seeds says how many."""
    if not inpaint:
        for given, option in ((image, "--image"), (mask, "--mask"), (resample or None, "--resample")):
            if given is not None:
                fail(f"{option} edits images: add --inpaint (with --image FILE_OR_FOLDER)")
    elif image is None:
        fail("--inpaint needs --image FILE_OR_FOLDER: the image(s) to edit")
    elif not (num or seeds):
        return 4
    return num


def _inpaint(run: Run, image: Path, mask: str, resample: int, options: dict) -> None:
    """`sample --inpaint`: editing.inpaint_run with the checked options; says what it wrote."""
    from . import editing
    from .console import Bars

    with Bars(err) as bars:
        written = editing.inpaint_run(run, image=image, mask=mask, resample=resample, progress=bars, **options)
    for path in written:
        out.print(f"wrote {path}", markup=False)


def _generate(run: Run, vae: Optional[Path], options: dict) -> None:
    """`sample`: sampling.sample_run with the checked options; says what it wrote (and when the grid holds only
    the first GRID_MAX images)."""
    from . import sampling
    from .console import Bars

    with Bars(err) as bars:
        written = sampling.sample_run(run, progress=bars, vae=vae, **options)
    count, grid = len(options["seeds"]), options["grid"]
    for path in written:
        shown = f" (the first {sampling.GRID_MAX} of {count} images)" if path == grid and count > sampling.GRID_MAX \
            else ""
        out.print(f"wrote {path}{shown}", markup=False)
