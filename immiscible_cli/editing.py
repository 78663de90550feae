"""Image editing with a trained run: in-painting and out-painting (`immiscible sample RUN --inpaint`).

Masks: white (>= 128) = generate, black = keep. The named masks name the region they generate: `center` (the
centred square of half the side), `left-half`, `outpaint-8px` (the 8-pixel border; any `outpaint-Npx`).
Input images reach the run's resolution and channels as its training data did (data.match_channels,
data.fit_resolution), then model space times assigner.image_scale; outputs go through assigners.decode.

After every sampler step the known region is re-imposed at the step's noise level (the objectives' `after_step`)
by the objective's `noised` (ddpm x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, Ho et al. 2020, Eq. 4; flow x_t =
t data + (1 - t) noise), the noise fresh from the edit's own seeded stream, so a result depends on its seed alone
(image i of a batch uses seed i, as in `sample`). After the last step the known pixels are the input's.
`--resample R` adds RePaint's R jumps back of one step per step (Lugmayr et al. 2022). A sampler outside the
objective's `editable_samplers` (dopri5) is refused: its adaptive steps have no fixed points to re-impose at.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .config import Config, DataConfig
from .console import Progress
from .data import fit_resolution, match_channels, to_model_space
from .datasets import IMAGE_SUFFIXES, SOURCES
from .errors import UserError
from .generation import SeededNoise, generate
from .images import save_each, save_png
from .objectives import Objective, build_objective
from .runs import Run

NAMED_MASKS = ("center", "left-half", "outpaint-8px")
EDITS_MAX = 1024  # edits (seeds) per input image
MAX_PIXELS = 8192 * 8192  # an input image or mask at most this large, checked from its header before decoding


class EditError(UserError):
    """An input image or mask that cannot be used; the message names --image or --mask."""


def named_mask(name: str, resolution: int) -> torch.Tensor | None:
    """bool [1, R, R], True = generate, for a named mask; None when `name` is not one."""
    fill = torch.zeros((1, resolution, resolution), dtype=torch.bool)
    half, quarter = resolution // 2, resolution // 4
    border = re.fullmatch(r"outpaint-(\d+)px", name)
    if name == "center":
        fill[:, quarter:quarter + half, quarter:quarter + half] = True
    elif name == "left-half":
        fill[:, :, :half] = True
    elif border:
        width = int(border.group(1))
        if not 0 < width < half:
            raise EditError(f"--mask {name}: the border must be 1..{half - 1} px wide at the run's resolution "
                            f"{resolution}, to leave a known inside")
        fill[:] = True
        fill[:, width:resolution - width, width:resolution - width] = False
    else:
        return None
    return fill


def read_image(path: Path, option: str) -> torch.Tensor:
    """One image file as uint8 [1, C, h, w], C = 1 for grey images, 3 otherwise (alpha dropped). Its size is checked
    from the header before it is decoded (MAX_PIXELS: a small file may declare a huge image); 16-bit grey images are
    scaled to 8 bits (65535 -> 255), not clipped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise EditError(f"{option} {path}: {im.width}x{im.height} px, over {MAX_PIXELS:,}; give an image of "
                                f"at most {MAX_PIXELS:,} pixels (the run's resolution is enough)")
            if im.mode.startswith("I;16") or im.mode == "I":
                wide = np.asarray(im).astype(np.int64)
                deep = im.mode.startswith("I;16") or wide.max(initial=0) > 255
                array = np.clip(np.rint(wide / 257.0) if deep else wide, 0, 255).astype(np.uint8)
                im = Image.fromarray(array)
            im = im.convert("L" if im.getbands() in (("L",), ("1",), ("I",), ("F",), ("L", "A")) else "RGB")
    except Image.DecompressionBombError:  # PIL's own check on opening, for sizes far past MAX_PIXELS
        raise EditError(f"{option} {path}: its header declares over {MAX_PIXELS:,} pixels; give an image of at "
                        f"most {MAX_PIXELS:,} pixels (the run's resolution is enough)") from None
    except (OSError, ValueError) as e:
        raise EditError(f"{option} {path}: cannot read it as an image ({type(e).__name__})") from None
    array = np.asarray(im, np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)  # [1, C, h, w]


def fit_geometry(images: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """uint8 [N, C, h, w] -> [N, C, R, R] as the run's data: a source that `crops_and_resizes` (imagefolder)
    centre-crops a square then resizes; the others pad or resize (data.fit), a non-square image being centre-cropped
    first when resizing."""
    h, w = images.shape[-2:]
    fit = "resize" if SOURCES[data.source].crops_and_resizes else data.fit
    if fit == "resize" and h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top:top + side, left:left + side]
    return fit_resolution(images, data.resolution, fit)


def load_inputs(image: Path, mask: str, data: DataConfig) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, uint8 [N, C, R, R] images, bool [N, 1, R, R] regions to generate) from --image (a file, or a folder
    of image files) and --mask (a named mask, or a PNG at the run's resolution or at the images' size)."""
    if image.is_dir():
        files = sorted(p for p in image.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EditError(f"--image {image}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    elif image.is_file():
        files = [image]
    else:
        raise EditError(f"--image {image}: no such file or folder")
    raw = [read_image(p, "--image") for p in files]
    known = torch.cat([fit_geometry(match_channels(x, data.channels), data) for x in raw])  # [N, C, R, R]
    names = [p.stem for p in files]
    names = names if len(set(names)) == len(names) else [p.name.replace(".", "_") for p in files]
    resolution = data.resolution
    if not mask.strip():
        raise EditError(f"--mask is empty; give {' | '.join(NAMED_MASKS)} or a black-and-white PNG (white = "
                        f"generate)")
    fill = named_mask(mask, resolution)
    if fill is not None:
        return names, known, fill.expand(len(files), -1, -1).unsqueeze(1)
    path = Path(mask)
    if not path.is_file():
        raise EditError(f"--mask {mask}: not a file nor a named mask ({', '.join(NAMED_MASKS)})")
    drawn = read_image(path, "--mask")  # [1, C, h, w]
    if drawn.shape[1] != 1 and not bool((drawn == drawn[:, :1]).all()):
        raise EditError(f"--mask {mask}: a colour image; a mask is black and white (grey): white = generate, "
                        f"black = keep")
    drawn = drawn[:, :1]  # [1, 1, h, w]
    size = tuple(drawn.shape[-2:])
    masks = []
    for p, x in zip(files, raw):
        if size == (resolution, resolution):
            masks.append(drawn)
        elif size == tuple(x.shape[-2:]):
            masks.append(fit_geometry(drawn, data))
        else:
            raise EditError(f"--mask {mask}: {size[1]}x{size[0]} px; expected {resolution}x{resolution} (the "
                            f"run's resolution) or the size of {p.name} ({x.shape[-1]}x{x.shape[-2]})")
    if not bool((drawn >= 128).any()):
        raise EditError(f"--mask {mask}: all black, so nothing would be generated; paint white where images are "
                        f"to be generated")
    fill = torch.cat(masks) >= 128  # [N, 1, R, R]
    if not bool(fill.flatten(1).any(1).all()):  # white too thin to survive the resize to the run's resolution
        raise EditError(f"--mask {mask}: no white pixel left at the run's resolution {resolution}, so nothing would "
                        f"be generated; paint a larger white region")
    return names, known, fill


class Reimpose:
    """`after_step` for one batch: the known region of x replaced by the known image at x's noise level."""

    def __init__(self, objective: Objective, known: torch.Tensor, fill: torch.Tensor,
                 randn: Callable[[torch.Tensor], torch.Tensor]):
        self.objective, self.randn = objective, randn
        self.known, self.keep = known, ~fill  # [b, C, H, W], [b, 1, H, W]

    def __call__(self, x: torch.Tensor, level: float) -> torch.Tensor:
        noise = self.randn(x)  # drawn at every step, level 1 included: each stream's draws never depend on x
        known_now = self.objective.noised(self.known, noise, level)  # [b, C, H, W]
        return torch.where(self.keep, known_now.to(x.dtype), x)  # [b, C, H, W]


def inpaint(net: torch.nn.Module, cfg: Config, known: torch.Tensor, fill: torch.Tensor, seeds: Sequence[int], *,
            sampler: str, steps: int, guidance: float = 1.0, label: int | None = None, resample: int = 0,
            batch: int = 64, device: torch.device | None = None) -> torch.Tensor:
    """uint8 [N, S, C, R, R]: image n [C, R, R] (uint8, at the run's size) edited in `fill` [N, 1, R, R] (True =
    generate) once per seed; edit (n, s) is `generation.generate`'s image for seed s with the known region imposed."""
    objective = build_objective(cfg.objective)
    if sampler in objective.samplers and sampler not in objective.editable_samplers:
        raise EditError(f"--sampler {sampler}: the adaptive solver has no fixed steps to re-impose the known region "
                        f"at; use --sampler {' or '.join(objective.editable_samplers)}")
    device = device or next(net.parameters()).device
    count, per_image = known.shape[0], len(seeds)
    known_model = to_model_space(known) * cfg.assigner.image_scale  # [N, C, R, R], the data's model space

    def options(start: int, noise: SeededNoise) -> dict:
        rows = torch.arange(start, start + len(noise.generators)) // per_image  # input image of each edit
        return {"after_step": Reimpose(objective, known_model[rows].to(device), fill[rows].to(device),
                                       noise.randn_like), "resample": resample}

    edits = generate(net, cfg, [s for _ in range(count) for s in seeds], sampler=sampler, steps=steps,
                     guidance=guidance, labels=None if label is None else [label] * count * per_image,
                     batch=batch, device=device, sampler_options=options)  # [N * S, C, R, R]
    return edits.view(count, per_image, *edits.shape[1:])


def edit_grid(known: torch.Tensor, fill: torch.Tensor, edits: torch.Tensor) -> np.ndarray:
    """[N * R, (2 + S) * R, C] uint8: per row an input [C, R, R], its mask (white = generated), its S edits."""
    count, columns, channels, height, width = edits.shape[0], edits.shape[1] + 2, *edits.shape[2:]
    mask_image = (fill.to(torch.uint8) * 255).expand(-1, channels, -1, -1)  # [N, C, R, R]
    rows = torch.cat([known.unsqueeze(1), mask_image.unsqueeze(1), edits], dim=1)  # [N, 2 + S, C, R, R]
    return rows.permute(0, 3, 1, 4, 2).reshape(count * height, columns * width, channels).numpy()


def inpaint_run(run: Run, *, ckpt: str, image: Path, mask: str, seeds: Sequence[int], steps: int | None,
                sampler: str | None, guidance: float | None, label: int | None, batch: int | None, resample: int,
                out_dir: Path | None, grid: Path | None, ema: bool, device: str,
                progress: Progress | None = None, overrides: Sequence[str] = ()) -> list[Path]:
    """`immiscible sample --inpaint`: every input edited once per seed; the edits as PNG files in `out_dir`
    (NAME-seedSSSSSS.png), and the grid of inputs, masks and edits at `grid` (default OUT/inpaint-grid.png)."""
    from .sampling import load_for_sampling

    if len(seeds) > EDITS_MAX:
        raise EditError(f"--num/--seeds: {len(seeds)} edits per image; give at most {EDITS_MAX}")
    if run.config().data.source == "latents":
        raise EditError(f"--inpaint: {run.path} trains on VAE latents, and in-painting keeps known pixels of an "
                        f"image run; sample it without --inpaint")
    names, known, fill = load_inputs(Path(image), mask, run.config().data)  # bad input fails before the network
    net, cfg, sampler, torch_device = load_for_sampling(run, ckpt=ckpt, ema=ema, device=device, sampler=sampler,
                                                        steps=steps, guidance=guidance, label=label,
                                                        overrides=overrides)
    seeds, rows = list(seeds), []
    for n, name in enumerate(names):
        edits = inpaint(net, cfg, known[n:n + 1], fill[n:n + 1], seeds, sampler=sampler,
                        steps=steps or cfg.sample.steps, label=label, resample=resample,
                        guidance=cfg.sample.guidance if guidance is None else guidance,
                        batch=batch or cfg.sample.batch_size, device=torch_device)  # [1, S, C, R, R]
        if out_dir is not None:
            save_each(edits[0], [f"{name}-seed{seed:06d}.png" for seed in seeds], Path(out_dir))
        rows.append(edits)
        if progress is not None:
            progress(n + 1, len(names), "inpaint")
    grid_path = Path(grid) if grid is not None else Path(out_dir) / "inpaint-grid.png"
    save_png(edit_grid(known, fill, torch.cat(rows)), grid_path)
    return [Path(p) for p in (out_dir, grid_path) if p is not None]
