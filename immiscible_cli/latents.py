"""The latents file `immiscible encode` writes and `data.source: latents` trains on, and the VAE a latent run decodes
its samples with.

A latents file is a safetensors file holding `latents` [N, C, h, w] (float16 or float32: the VAE's posterior mean,
shifted and scaled as vae.Vae.encode says), `labels` [N] int64 when the images had classes, and string metadata:
`format` (FORMAT) and `format_version`, `vae` (vae.VaeIdentity.record() as JSON: folder, sha256 of config.json and
weights, scaling and shift factors, channels, downsampling), `source` (JSON: the preset and the data section the
images were read with), `images`, `num_classes`, `precision` and `encoding` ("mean"). `read_header` checks all of
it without reading the tensors; `load_latent_set` gives the trainer a `datasets.ImageSet` whose `images` are the float
latents (already in model space) after checking them against data.channels and data.resolution.

A run on latents records the header in meta.json (`latents`); `sample` and `eval` decode with the VAE recorded
there (`run_decoder`, another folder with `--vae`), the trainer with the one recorded in the file (`data.vae`),
each checked by sha256 before anything is generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import vae as vae_mod
from .config import Config, DataConfig
from .datasets import DataError, ImageSet
from .files import own_file_problem, write_atomic
from .runs import Run

FORMAT = "immiscible-latents"
FORMAT_VERSION = 1
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
MAKE_ONE = "make one with `immiscible encode --vae DIR --preset P --out FILE`"


@dataclass(frozen=True)
class LatentHeader:
    """What a latents file says of itself (its metadata and tensor shapes), or what meta.json recorded of it."""

    path: str  # the file, absolute ("" while it is being written)
    vae: vae_mod.VaeIdentity
    source: dict[str, Any]  # {"preset": name or file, "data": the DataConfig section the images were read with}
    images: int
    shape: tuple[int, int, int]  # [C, h, w] of one latent
    num_classes: int  # 0: no labels
    precision: str

    def source_data(self) -> DataConfig:
        """The data section of the images behind the latents (FID's reference images)."""
        return DataConfig.model_validate(self.source["data"])

    def record(self) -> dict[str, Any]:
        """What meta.json keeps (`latents`), so a run decodes and is scored without its latents file."""
        return {"file": self.path, "vae": self.vae.record(), "source": self.source, "images": self.images,
                "shape": list(self.shape), "num_classes": self.num_classes, "precision": self.precision}

    @classmethod
    def from_record(cls, record: Any, where: str) -> "LatentHeader":
        try:
            return cls(str(record["file"]), vae_mod.VaeIdentity.from_record(record["vae"], where),
                       dict(record["source"]), int(record["images"]), tuple(int(n) for n in record["shape"]),
                       int(record["num_classes"]), str(record["precision"]))
        except (TypeError, KeyError, ValueError) as e:
            raise DataError(f"{where}: its `latents` record is not readable ({type(e).__name__}: {e}); restore the "
                            f"file") from None


def metadata(header: LatentHeader) -> dict[str, str]:
    """The safetensors metadata of a latents file (strings only, no time: the same inputs give the same bytes)."""
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "encoding": "mean",
            "vae": json.dumps(header.vae.record(), sort_keys=True), "source": json.dumps(header.source, sort_keys=True),
            "images": str(header.images), "num_classes": str(header.num_classes), "precision": header.precision}


def require_safetensors() -> Any:
    """The safetensors package (installed with diffusers); DataError with the extra to install without it."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401 - the submodule the callers use
    except ImportError:
        raise DataError(f"latents files are safetensors files: {vae_mod.EXTRA}") from None
    return safetensors


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


def save(path: Path, tensors: dict[str, list[torch.Tensor]], meta: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically from tensors given as pieces along dim 0 (written in order, never joined
    in memory). The header's keys are sorted, so the same tensors and metadata give the same bytes (the
    safetensors package writes metadata in a random order). Read back with the safetensors package."""
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name in sorted(tensors):
        pieces = tensors[name]
        size = sum(p.numel() * p.element_size() for p in pieces)
        header[name] = {"dtype": SAFETENSORS_DTYPES[pieces[0].dtype], "data_offsets": [offset, offset + size],
                        "shape": [sum(len(p) for p in pieces), *pieces[0].shape[1:]]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned

    def parts() -> Iterator[bytes]:
        yield len(text).to_bytes(8, "little") + text
        for name in sorted(tensors):
            for piece in tensors[name]:  # little-endian, as safetensors stores them (every platform torch runs on)
                yield piece.detach().cpu().contiguous().numpy().tobytes()

    write_atomic(path, parts())


def write(path: Path, latents: list[torch.Tensor], labels: list[torch.Tensor] | None, header: LatentHeader) -> None:
    """Write a latents file atomically: `latents` (and `labels`) as pieces along dim 0 (`save`)."""
    save(path, {"latents": latents, **({"labels": labels} if labels is not None else {})}, metadata(header))


def _fail(path: Path, problem: str) -> DataError:
    return DataError(f"data.root {path}: {problem}; {MAKE_ONE}")


def read_header(path: Path | str) -> LatentHeader:
    """A latents file's header, checked (format, version, metadata, tensor shapes and dtypes); a DataError naming
    the file otherwise. The tensors are not read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise _fail(path, "no such file")
    problem = own_file_problem(path)
    if problem:
        raise _fail(path, f"not read: {problem}")
    safetensors = require_safetensors()
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            shapes = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in names}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        raise _fail(path, f"not a safetensors file ({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None
    if meta.get("format") != FORMAT or "latents" not in names:
        raise _fail(path, "a safetensors file, but not of immiscible latents (no `latents` tensor or format tag)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise _fail(path, f"format version {meta.get('format_version')}, this immiscible reads {FORMAT_VERSION}")
    try:
        header = LatentHeader(str(path.resolve()), vae_mod.VaeIdentity.from_record(json.loads(meta["vae"]), str(path)),
                              json.loads(meta["source"]), int(meta["images"]), shapes["latents"][1][1:],
                              int(meta["num_classes"]), meta["precision"])
        header.source_data()  # the images behind them (FID's reference) must be describable
    except (KeyError, ValueError, TypeError) as e:
        raise _fail(path, f"its metadata is not readable ({type(e).__name__}: {e})") from None
    dtype, shape = shapes["latents"]
    if len(shape) != 4 or shape[0] != header.images or dtype not in ("F16", "F32"):
        raise _fail(path, f"`latents` is {dtype} {list(shape)}, expected F16/F32 [{header.images}, C, h, w]")
    if header.num_classes and "labels" not in shapes:
        raise _fail(path, f"its metadata says {header.num_classes} classes, but it holds no `labels`")
    if "labels" in shapes and shapes["labels"] != ("I64", (header.images,)):
        raise _fail(path, f"`labels` is {shapes['labels'][0]} {list(shapes['labels'][1])}, expected I64 "
                          f"[{header.images}]")
    return header


def check_fits(header: LatentHeader, data: DataConfig) -> None:
    """DataError naming data.channels or data.resolution when the latents are not what the model takes."""
    channels, height, width = header.shape
    if channels != data.channels:
        raise DataError(f"data.channels: {data.channels}, but {header.path} holds {channels}-channel latents; set "
                        f"data.channels={channels}")
    if height != width or height != data.resolution:
        raise DataError(f"data.resolution: {data.resolution}, but {header.path} holds {height}x{width} latents; set "
                        f"data.resolution={height}" + ("" if height == width else " (square latents only)"))


def load_latent_set(data: DataConfig) -> ImageSet:
    """The latents of `data.root` as an ImageSet (float32 latents in model space, labels or -1), checked against
    data.channels and data.resolution; data.max_images applies."""
    if data.root is None:
        raise DataError(f"data.root: data.source=latents needs the latents file; set data.root=FILE ({MAKE_ONE})")
    header = read_header(data.root)
    check_fits(header, data)
    safetensors = require_safetensors()
    count = min(header.images, data.max_images or header.images)
    with safetensors.safe_open(header.path, "pt") as f:
        latents = f.get_slice("latents")[:count].to(torch.float32)  # [N, C, h, w]
        labels = f.get_slice("labels")[:count] if header.num_classes else torch.full((count,), -1)
    name = f"latents-{Path(header.path).stem}"
    return ImageSet(latents.contiguous(), labels.to(torch.int64), header.num_classes, name)


# ------------------------------------------------------------------------------------------------------------------
# the VAE of a latent run


def training_header(cfg: Config) -> LatentHeader | None:
    """The header of the run's latents file; None for image data."""
    return read_header(cfg.data.root) if cfg.data.source == "latents" and cfg.data.root else None


def _training_folder(cfg: Config, header: LatentHeader) -> tuple[str, str]:
    """(folder, where it came from) of the VAE a run on latents decodes with: data.vae, else the file's record."""
    return (cfg.data.vae, "data.vae") if cfg.data.vae else (header.vae.path, f"recorded in {header.path}")


def check_training_vae(cfg: Config) -> None:
    """Before any work on latents: the file's header, its fit to the model, diffusers, and the VAE folder's sha256
    (the one recorded in the file). Nothing for image data."""
    header = training_header(cfg)
    if header is not None:
        check_fits(header, cfg.data)
        vae_mod.require_diffusers()
        vae_mod.check(header.vae, *_training_folder(cfg, header), "--set data.vae=DIR")


def training_vae(cfg: Config, device: torch.device) -> tuple[LatentHeader, vae_mod.Vae] | None:
    """For training on latents: the file's header and its VAE (checked by sha256) on `device`; None for images."""
    header = training_header(cfg)
    if header is None:
        return None
    return header, vae_mod.load(header.vae, *_training_folder(cfg, header), "--set data.vae=DIR", device)


def run_header(run: Run, cfg: Config) -> LatentHeader | None:
    """What a latent run recorded of its latents (meta.json, else its latents file); None for an image run."""
    if cfg.data.source != "latents":
        return None
    record = run.meta().get("latents")
    if record is None:
        return read_header(cfg.data.root)
    return LatentHeader.from_record(record, str(run.path / "meta.json"))


def run_decoder(run: Run, cfg: Config, folder: Path | None, device: torch.device) -> vae_mod.Vae | None:
    """The VAE that decodes a run's samples: the recorded one (or `folder`, `--vae`), checked by sha256; None for
    an image run (where `--vae` is refused)."""
    header = run_header(run, cfg)
    if header is None:
        if folder is not None:
            raise vae_mod.VaeError(f"--vae {folder}: {run.path} trains on images (data.source={cfg.data.source}), "
                                   f"which need no VAE; drop --vae")
        return None
    source = "--vae" if folder is not None else f"recorded in {run.path / 'meta.json'}"
    return vae_mod.load(header.vae, folder or header.vae.path, source, "--vae DIR", device)
