"""The VAE of latent runs: a diffusers `AutoencoderKL` in a local folder, who it is, and the two maps through it.

`identify(folder)` reads its identity without diffusers: the sha256 of its config.json and of the weights file(s)
`from_pretrained` reads, and the config's scaling and shift factors, latent and image channels and downsampling
factor. A latents file records it (`encode`), a run's meta.json records it, FID rows record its `setting()`.
`load(recorded, folder)` loads the VAE only once the folder's identity equals the recorded one (a missing folder or
another sha256 is one line naming the folder and the option that points elsewhere), so grids and FIDs are always
decoded by the VAE that encoded the training latents.

`Vae.encode`: images in [-1, 1] -> the mean of the latent distribution, (mean - shift) x scale (deterministic: what
trainers cache). `Vae.decode`: the inverse map, latents / scale + shift -> decoder -> images clipped to [-1, 1],
in batches of DECODE_BATCH. A network carries its Vae to `generation.generate` as an attribute (`attach`), the way
it carries its noise moments (start_noise.attach), so every image maker decodes without another argument.

diffusers is optional: nothing imports it until a VAE is loaded; without it, one line says which extra to install.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

EXTRA = "pip install 'immiscible[examples]'"
CONFIG = "config.json"
# The weights `AutoencoderKL.from_pretrained` reads without a variant, in the order it looks for them
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
           "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
DECODE_BATCH = 16  # latents per decoder call: its activations at the full image size dominate memory
_ATTRIBUTE = "immiscible_vae"


class VaeError(UserError):
    """A VAE folder that is missing, unreadable, not an AutoencoderKL or not the recorded one; or no diffusers."""


@dataclass(frozen=True)
class VaeIdentity:
    """What a latents file, meta.json and FID rows record of a VAE (`record()`), and what `load` checks."""

    path: str  # the folder, absolute
    config_sha256: str
    weights_sha256: str  # of the weights files' names and sha256s, in `weights` order
    weights: tuple[str, ...]  # the files hashed (one, or an index and its shards)
    scaling_factor: float
    shift_factor: float | None
    latent_channels: int
    in_channels: int
    downsampling: int  # image side / latent side

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "weights": list(self.weights)}

    @classmethod
    def from_record(cls, record: Any, where: str) -> "VaeIdentity":
        """The identity `record()` wrote; VaeError naming `where` when it is not one."""
        try:
            return cls(**{**record, "weights": tuple(record["weights"])})
        except (TypeError, KeyError) as e:
            raise VaeError(f"{where}: the recorded VAE is not readable ({type(e).__name__}: {e}); encode the "
                           f"latents again with `immiscible encode`") from None

    def setting(self) -> dict[str, Any]:
        """What makes two decoders the same for FID (the folder may move): the sha256s and the latent scaling."""
        return {"config_sha256": self.config_sha256, "weights_sha256": self.weights_sha256,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}


_HASHES: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256: a VAE is hashed once


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, remembered for this process while its size and modification time stay."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def weight_files(folder: Path, where: str) -> list[str]:
    """The weights file(s) `from_pretrained` reads from `folder`: one file, or an index and the shards it names."""
    for name in WEIGHTS:
        if (folder / name).is_file():
            if not name.endswith(".index.json"):
                return [name]
            try:
                shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise VaeError(f"{where}: {name} is not a diffusers weights index; restore the VAE folder") from None
            return [name, *shards]
    raise VaeError(f"{where}: no weights ({WEIGHTS[0]} or {WEIGHTS[2]}) in the folder; give the folder of a "
                   f"diffusers AutoencoderKL (e.g. the vae/ folder of a Stable Diffusion checkpoint)")


def identify(folder: Path | str, source: str, option: str) -> VaeIdentity:
    """The identity of the AutoencoderKL in `folder` (no diffusers needed). VaeError when it is missing or is not
    one, naming the folder, where it came from (`source`: "--vae", "recorded in FILE") and how to give another
    (`option`: "--vae DIR")."""
    folder = Path(folder).expanduser().resolve()
    where = f"VAE folder {folder} ({source})"
    if not folder.is_dir():
        raise VaeError(f"{where}: no such folder; give the diffusers AutoencoderKL folder (config.json and "
                       f"weights) with {option}")
    try:
        config = json.loads((folder / CONFIG).read_text())
        out = config["block_out_channels"]
        identity = {"scaling_factor": float(config.get("scaling_factor", 1.0)),
                    "shift_factor": None if config.get("shift_factor") is None else float(config["shift_factor"]),
                    "latent_channels": int(config["latent_channels"]), "in_channels": int(config["in_channels"]),
                    "downsampling": 2 ** (len(out) - 1)}
    except FileNotFoundError:
        raise VaeError(f"{where}: no {CONFIG}; give the folder of a diffusers AutoencoderKL with {option}") from None
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise VaeError(f"{where}: {CONFIG} is not an AutoencoderKL config ({type(e).__name__}: {e}); give the "
                       f"folder of a diffusers AutoencoderKL with {option}") from None
    names = weight_files(folder, where)
    hashes = [f"{name}:{sha256_file(folder / name)}" for name in names]
    weights = hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    return VaeIdentity(str(folder), sha256_file(folder / CONFIG), weights, tuple(names), **identity)


def check(recorded: VaeIdentity, folder: Path | str, source: str, option: str) -> VaeIdentity:
    """The identity of `folder` (`identify`), which must equal `recorded` (config.json and weights); else one line
    naming the folder, the file that differs and the recorded VAE."""
    found = identify(folder, source, option)
    for name, field in (("config.json", "config_sha256"), ("weights", "weights_sha256")):
        have, want = getattr(found, field), getattr(recorded, field)
        if have != want:
            raise VaeError(f"VAE folder {found.path} ({source}): its {name} (sha256 {have[:12]}) is not the one "
                           f"the latents were encoded with ({want[:12]}, the VAE at {recorded.path}); give that VAE "
                           f"with {option}")
    return found


def require_diffusers() -> Any:
    """diffusers' AutoencoderKL class; VaeError with the extra to install when diffusers is missing."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise VaeError(f"latents need diffusers to encode and decode (AutoencoderKL): {EXTRA}") from None
    return AutoencoderKL


class Vae:
    """A loaded AutoencoderKL with its identity: `encode` images to scaled latents, `decode` them back."""

    def __init__(self, model: torch.nn.Module, identity: VaeIdentity):
        self.model, self.identity = model, identity
        self.scale, self.shift = identity.scaling_factor, identity.shift_factor or 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float images [B, C, H, W] in [-1, 1] -> float32 latents [B, c, H / f, W / f]: (posterior mean - shift)
        x scale, on the VAE's device."""
        mean = self.model.encode(images.to(self.device, torch.float32)).latent_dist.mean
        return ((mean - self.shift) * self.scale).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """float latents [B, c, h, w] -> float32 images [B, C, h f, w f] clipped to [-1, 1], on the latents'
        device; DECODE_BATCH latents per decoder call."""
        pieces = [self.model.decode(part.to(self.device, torch.float32) / self.scale + self.shift).sample
                  for part in latents.split(DECODE_BATCH)]
        return torch.cat(pieces).float().clamp(-1, 1).to(latents.device)


def load(recorded: VaeIdentity | None, folder: Path | str, source: str, option: str, device: torch.device) -> Vae:
    """The VAE in `folder` (checked against `recorded`, when given: `check`) in eval mode on `device`. Reads local
    files only, and exactly the weights that were hashed."""
    identity = check(recorded, folder, source, option) if recorded is not None else identify(folder, source, option)
    autoencoder = require_diffusers()
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its notes would break the one-line error and output contract
    try:
        model = autoencoder.from_pretrained(identity.path, local_files_only=True,
                                            use_safetensors=".safetensors" in identity.weights[0])
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a folder it cannot load
        reason = " ".join(str(e).split())[:160]
        raise VaeError(f"VAE folder {identity.path} ({source}): diffusers could not load it as an AutoencoderKL "
                       f"({type(e).__name__}: {reason})") from None
    finally:
        diffusers_logging.set_verbosity(level)
    return Vae(model.to(device).eval().requires_grad_(False), identity)


def attach(net: torch.nn.Module, vae: Vae | None) -> torch.nn.Module:
    """Let `net` carry the VAE that decodes its samples (read by generation.generate); returns net. A plain
    attribute: the VAE's weights are not the network's (not in its state_dict)."""
    object.__setattr__(net, _ATTRIBUTE, vae)
    return net


def attached(net: torch.nn.Module) -> Vae | None:
    return getattr(net, _ATTRIBUTE, None)
