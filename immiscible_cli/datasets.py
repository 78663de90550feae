"""Dataset sources: one reader per source (DataConfig.source) of uint8 images, labels and the class count, and the
registry `SOURCES` of what the pipeline knows of each (its splits, how it fits images); data.py makes them an
`ImageSet` at the run's resolution. Nothing here imports torch.

Sources:
  embedded       10,000 Fashion-MNIST train images shipped inside the package (works with no network)
  fashion-mnist  idx files (raw or .gz) in torchvision's layout ROOT/FashionMNIST/raw/ or Debian's flat folder
                 /usr/share/datasets/fashion-mnist/ (looked up when no root is given); torchvision download online
  cifar10        ROOT/cifar-10-batches-py/ (read directly) or ROOT/cifar-10-python.tar.gz (md5-checked and
                 extracted by torchvision); torchvision download online
  imagefolder    any folder tree of images; labels from first-level sub-folders (the classes, in sorted order)
`latents` (a file written by `immiscible encode`) is not a dataset but VAE latents of one: latents.py reads it.
"""

from __future__ import annotations

import codecs
import gzip
import lzma
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .cache import cache_root
from .config import DataConfig
from .errors import UserError

if TYPE_CHECKING:
    import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class DataError(UserError):
    """A dataset that cannot be found or read; the message says where it looked and how to provide it."""


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, C, H, W] uint8 pixels, or float latents in model space (data.source: latents)
    labels: torch.Tensor  # [N] int64, -1 = unlabelled
    num_classes: int  # classes of the source; 0 = none (an imagefolder without class sub-folders)
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]


# ------------------------------------------------------------------------------------------------------------------
# readers, one per source


def read_idx(path: Path) -> np.ndarray:
    """An idx file (raw, .gz or .xz): magic 0x0000080N (N = number of dimensions), big-endian sizes, uint8 data."""
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated idx file ({data.size} bytes of data, header says {int(np.prod(dims))})")
    return data.reshape(tuple(dims))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def load_fashion_mnist(root: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """[N, 28, 28] uint8 images and [N] labels of one split; only that split's two files are needed."""
    prefix = "train" if split == "train" else "t10k"
    if root is None:
        folders = [DEBIAN_FASHION_MNIST]
    else:
        folders = [Path(root) / "FashionMNIST" / "raw", Path(root)]
    for folder in folders:
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return read_idx(images), read_idx(labels)
    download_root = Path(root) if root else cache_root() / "datasets"
    try:  # online users: torchvision fetches all four files into ROOT/FashionMNIST/raw
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(download_root), train=split == "train", download=True)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
        looked = " and ".join(str(f) for f in folders)
        raise DataError(
            f"Fashion-MNIST {split} split not found in {looked} and the download failed ({type(e).__name__}); "
            f"install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put "
            f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] in ROOT/FashionMNIST/raw/ and set "
            f"data.root=ROOT") from None
    raw = download_root / "FashionMNIST" / "raw"
    return read_idx(_find_idx(raw, f"{prefix}-images-idx3-ubyte")), read_idx(_find_idx(raw, f"{prefix}-labels-idx1-ubyte"))


def load_embedded() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 Fashion-MNIST images shipped in the package (1,000 per class; see assets/LICENSE-fashion-mnist)."""
    return (read_idx(ASSETS / "fashion-mnist-10k-images-idx3-ubyte.xz"),
            read_idx(ASSETS / "fashion-mnist-10k-labels-idx1-ubyte.xz"))


CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol 2 (always latin1); any other codec is refused."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codec {encoding!r}")
    return codecs.encode(text, "latin1")


def _cifar_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR-10 batch may name: numpy array, dtype and scalar reconstruction, under numpy 1's
    and numpy 2's module names (the official files are Python 2 pickles naming numpy.core), and latin1 bytes."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch without running code: find_class admits only `_cifar_globals()` (arrays,
    dtypes, numpy scalars, bytes); everything else (os.system, builtins.eval, any class) is refused."""

    def find_class(self, module: str, name: str) -> object:
        found = _cifar_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}, which a CIFAR-10 batch never holds")
        return found


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """[N, 3, 32, 32] uint8 images and [N] labels of one batch file, read with CifarUnpickler (no code runs)."""
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], np.int64).reshape(-1)
    except Exception as e:  # noqa: BLE001 - a crafted or damaged pickle raises any type; all mean the same here
        reason = " ".join(str(e).split())[:160]
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {reason}); replace it with "
                        f"the file from cifar-10-python.tar.gz (re-extract it)") from None
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels; re-extract cifar-10-python.tar.gz")
    return images, labels


def load_cifar10(root: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """[N, 32, 32, 3] uint8 images and [N] labels, from the python pickles (read by `read_cifar_batch`, which runs no
    code; torchvision reads batch files only after checking their md5 against the official ones)."""
    root_path = Path(root) if root else cache_root() / "datasets"
    folder = root_path / "cifar-10-batches-py"
    if not all((folder / name).is_file() for name in CIFAR_FILES[split]):
        try:  # a local cifar-10-python.tar.gz is md5-checked and extracted without going online; else download
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root_path), train=split == "train", download=True)
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"CIFAR-10 not found in {root_path} and the download failed ({type(e).__name__}); either put the "
                f"extracted folder cifar-10-batches-py/ or cifar-10-python.tar.gz (from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html) in ROOT and set data.root=ROOT, or run once with "
                f"network access") from None
    batches = [read_cifar_batch(folder / name) for name in CIFAR_FILES[split]]
    return (np.concatenate([b[0] for b in batches]).transpose(0, 2, 3, 1),
            np.concatenate([b[1] for b in batches]))


def load_imagefolder(root: str | None, resolution: int, channels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every image under root, centre-cropped to a square and resized (bicubic) to resolution; labels: the index
    of its first-level sub-folder among the sorted sub-folders, -1 for an image directly under root."""
    from PIL import Image

    if root is None:
        raise DataError("data.root: imagefolder needs the folder of images; set data.root=PATH")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data.root: {base} is not a folder of images")
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {base}")
    classes = sorted({p.relative_to(base).parts[0] for p in files if len(p.relative_to(base).parts) > 1})
    class_index = {name: i for i, name in enumerate(classes)}
    images, labels = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if channels == 3 else "L")
        except OSError as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        array = np.asarray(im, np.uint8)
        images.append(array if array.ndim == 3 else array[:, :, None])
        parts = path.relative_to(base).parts
        labels.append(class_index[parts[0]] if len(parts) > 1 else -1)
    return np.stack(images), np.asarray(labels, np.int64), len(classes)


# ------------------------------------------------------------------------------------------------------------------
# the registry


Images = tuple[np.ndarray, np.ndarray, int]  # uint8 [N, H, W] (grey) or [N, H, W, C], int64 labels [N], classes


@dataclass(frozen=True)
class Source:
    """What the pipeline knows of one dataset source."""

    read: Callable[[DataConfig, str], Images]
    """The images, labels and class count of one split (a split the source lacks reads its only one)."""
    splits: tuple[str, ...] = ("train", "test")
    """Its splits: with one, the FID reference (eval.reference_split) takes train only and `analyze` finds no
    held-out split."""
    crops_and_resizes: bool = False
    """The reader centre-crops each image to a square and resizes it to data.resolution, whatever data.fit says
    (so `sample --inpaint` fits an input image that way too); otherwise data.fit pads or resizes."""
    name: Callable[[DataConfig], str] = lambda data: data.source
    """The set's name in reference statistics' keys and messages."""


SOURCES: dict[str, Source] = {
    "embedded": Source(lambda data, split: (*load_embedded(), 10), splits=("train",)),
    "fashion-mnist": Source(lambda data, split: (*load_fashion_mnist(data.root, split), 10)),
    "cifar10": Source(lambda data, split: (*load_cifar10(data.root, split), 10)),
    "imagefolder": Source(lambda data, split: load_imagefolder(data.root, data.resolution, data.channels),
                          splits=("train",), crops_and_resizes=True,
                          name=lambda data: f"imagefolder-{Path(data.root).resolve().name}"),
}
