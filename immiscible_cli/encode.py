"""`immiscible encode`: a preset's images through a diffusers AutoencoderKL into a latents file (latents.py),
chunked and resumable.

The images come from the data pipeline (data.load_images: the preset's data section with `--set`, in [-1, 1]);
grey images are repeated to RGB when the VAE takes 3 channels. Chunk c holds images [c B, (c + 1) B) for
`--batch` B, encoded in one call (vae.Vae.encode: the posterior mean, shifted and scaled) and written atomically
to OUT.partial/chunk-NNNNNN.safetensors, then listed in OUT.partial/progress.json with the settings it was made
with. A killed encode, run again with the same settings, skips the chunks listed there and writes the same bytes
as one that ran through (each chunk is the same call on the same images, on the same kind of device); other
settings are refused unless `--force`. The final file is written atomically from the chunks, then OUT.partial/ is
removed. An existing OUT is replaced only with `--force`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from . import latents, vae as vae_mod
from .config import Config, load_config
from .console import Progress, note
from .data import ImageSet, load_images, to_model_space
from .errors import UserError
from .files import check_writable, write_atomic
from .networks import pick_device

PROGRESS = "progress.json"


class EncodeError(UserError):
    """Options of `encode` that cannot work together, or a partial encode made with other settings."""


def partial_dir(out: Path) -> Path:
    """Where the chunks of an unfinished encode to `out` live."""
    return out.with_name(out.name + ".partial")


def chunk_path(partial: Path, index: int) -> Path:
    return partial / f"chunk-{index:06d}.safetensors"


def image_data(cfg: Config, vae: vae_mod.VaeIdentity) -> Config:
    """The config whose data section reads the images the VAE takes: an image source, at a resolution the VAE
    divides, with its channel count (grey repeated to RGB for a 3-channel VAE)."""
    data = cfg.data
    if data.source == "latents":
        raise EncodeError("data.source: latents are encoded already; give a preset (or --set) of images")
    if data.resolution % vae.downsampling:
        raise EncodeError(f"data.resolution: {data.resolution} is not divisible by the VAE's downsampling factor "
                          f"{vae.downsampling}; use a multiple of it (e.g. --set data.resolution=256)")
    if vae.in_channels not in (1, 3):
        raise EncodeError(f"--vae {vae.path}: the VAE takes {vae.in_channels}-channel images; images here have 1 "
                          f"or 3 channels")
    if data.channels != vae.in_channels:
        if not (data.channels == 1 and vae.in_channels == 3):
            raise EncodeError(f"data.channels: {data.channels}, but the VAE at {vae.path} takes "
                              f"{vae.in_channels}-channel images; set data.channels={vae.in_channels}")
        cfg = cfg.model_copy(update={"data": data.model_copy(update={"channels": 3})})  # grey, repeated to RGB
    return cfg


def make_header(cfg: Config, preset: str, identity: vae_mod.VaeIdentity, images: ImageSet,
                precision: str) -> latents.LatentHeader:
    """The header of the latents file an encode of `images` writes."""
    side = cfg.data.resolution // identity.downsampling
    labelled = images.num_classes > 0 and bool((images.labels >= 0).any())
    return latents.LatentHeader("", identity, {"preset": preset, "data": cfg.data.model_dump(mode="json")},
                                len(images), (identity.latent_channels, side, side),
                                images.num_classes if labelled else 0, precision)


def open_partial(out: Path, settings: dict[str, Any], force: bool) -> set[int]:
    """OUT.partial/ with its progress file: the chunks already done, when it holds an encode with these settings;
    made empty when there is none (or, with `force`, one with other settings)."""
    partial = partial_dir(out)
    progress = partial / PROGRESS
    if progress.is_file():
        try:
            saved = json.loads(progress.read_text())
            same, done = saved["settings"] == settings, {int(i) for i in saved["done"]}
        except (ValueError, KeyError, TypeError):
            same, done = False, set()
        if same:
            return {i for i in done if chunk_path(partial, i).is_file()}
        if not force:
            raise EncodeError(f"{partial}: holds an unfinished encode with other settings (VAE, data, --batch, "
                              f"--precision or --device); run it again with those, or add --force to start over")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_atomic(progress, json.dumps({"settings": settings, "done": []}).encode())
    return set()


def encode_chunks(images: ImageSet, vae: vae_mod.Vae, out: Path, settings: dict[str, Any], done: set[int],
                  progress: Progress | None) -> int:
    """Encode every chunk not in `done` into OUT.partial/ (each file atomic, then listed); returns the count."""
    batch, dtype = settings["batch"], latents.DTYPES[settings["precision"]]
    partial, count = partial_dir(out), math.ceil(len(images) / batch)
    for index in range(count):
        if index not in done:
            part = images.images[index * batch:(index + 1) * batch]
            encoded = vae.encode(to_model_space(part)).to(dtype)  # [b, c, h, w]
            labels = images.labels[index * batch:(index + 1) * batch]
            latents.save(chunk_path(partial, index), {"latents": [encoded], "labels": [labels]})
            done.add(index)
            write_atomic(partial / PROGRESS, json.dumps({"settings": settings, "done": sorted(done)}).encode())
        if progress is not None:
            progress(min((index + 1) * batch, len(images)), len(images), "encode")
    return count


def assemble(out: Path, count: int, header: latents.LatentHeader) -> None:
    """The final file from the chunks (atomically), then OUT.partial/ removed."""
    safetensors, partial = latents.require_safetensors(), partial_dir(out)
    parts, labels = [], []
    for index in range(count):
        with safetensors.safe_open(str(chunk_path(partial, index)), "pt") as f:
            parts.append(f.get_tensor("latents"))
            labels.append(f.get_tensor("labels"))
    latents.write(out, parts, labels if header.num_classes else None, header)
    shutil.rmtree(partial)


def encode(vae_dir: Path, preset: str | None, overrides: list[str], out: Path, *, batch: int, precision: str,
           device: str, force: bool, progress: Progress | None = None) -> latents.LatentHeader:
    """`immiscible encode`: the preset's images as latents in `out` (see the module docstring); the file's header."""
    if precision not in latents.DTYPES:
        raise EncodeError(f"--precision {precision}: expected one of {', '.join(latents.DTYPES)}")
    if out.exists() and not force:
        raise EncodeError(f"--out {out}: exists; add --force to replace it")
    check_writable(out, "file", "--out")
    identity = vae_mod.identify(vae_dir, "--vae", "--vae DIR")
    cfg = image_data(load_config(preset, overrides), identity)  # bad options fail before diffusers is imported
    torch_device = pick_device(device)
    model = vae_mod.load(identity, vae_dir, "--vae", "--vae DIR", torch_device)
    images = load_images(cfg.data)  # at the VAE's channel count (image_data)
    header = make_header(cfg, preset or cfg.name, identity, images, precision)
    settings = {**latents.metadata(header), "batch": batch, "device": torch_device.type}  # the same bits on resume
    done = open_partial(out, settings, force)
    note(progress, f"encoding {len(images)} images of {images.name} with the VAE at {identity.path} into {out} "
                   f"({len(done)} chunk(s) of {batch} done before)")
    count = encode_chunks(images, model, out, settings, done, progress)
    assemble(out, count, header)
    return latents.read_header(out)
