"""Dataset sources -> uint8 image sets at the training resolution, and a seeded batch stream in [-1, 1].

Sources (DataConfig.source):
  embedded       10,000 Fashion-MNIST train images shipped inside the package (works with no network)
  fashion-mnist  idx files (raw or .gz) in torchvision's layout ROOT/FashionMNIST/raw/ or Debian's flat folder
                 /usr/share/datasets/fashion-mnist/ (looked up when no root is given); torchvision download online
  cifar10        ROOT/cifar-10-batches-py/ (read directly) or ROOT/cifar-10-python.tar.gz (md5-checked and
                 extracted by torchvision); torchvision download online
  imagefolder    any folder tree of images; labels from first-level sub-folders (the classes, in sorted order)
  latents        a file written by `immiscible encode` (latents.py): VAE latents, float, already in model space

Every source gives an `ImageSet` (uint8 [N, C, H, W] at the configured resolution and channel count, labels int64
[N]: the dataset's own classes; an imagefolder image outside every class sub-folder is unlabelled, -1);
`check_classes` holds a conditional model's num_classes against them. `BatchStream` turns it into training
batches: an epoch-seeded permutation, random flips from the training generator, float in [-1, 1], on the GPU without
host copies when the set is resident there.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import lzma
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import cache_root
from .config import DataConfig
from .errors import UserError

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
# one entry point


def load_images(cfg: DataConfig, split: str | None = None) -> ImageSet:
    """The configured source as uint8 [N, C, H, W] at cfg.resolution with cfg.channels channels (latents: float
    [N, C, h, w] from the file, checked against both)."""
    if cfg.source == "latents":
        from .latents import load_latent_set

        return load_latent_set(cfg)
    split = split or cfg.split
    num_classes = 10
    if cfg.source == "embedded":
        images, labels = load_embedded()
    elif cfg.source == "fashion-mnist":
        images, labels = load_fashion_mnist(cfg.root, split)
    elif cfg.source == "cifar10":
        images, labels = load_cifar10(cfg.root, split)
    else:
        images, labels, num_classes = load_imagefolder(cfg.root, cfg.resolution, cfg.channels)
    if cfg.max_images is not None:
        images, labels = images[:cfg.max_images], labels[:cfg.max_images]
    tensor = torch.from_numpy(np.array(images, np.uint8))  # a writable copy (idx arrays are read-only views)
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)  # [N, C, H, W]
    tensor = fit_resolution(match_channels(tensor, cfg.channels), cfg.resolution, cfg.fit)
    name = cfg.source if cfg.source != "imagefolder" else f"imagefolder-{Path(cfg.root).resolve().name}"
    return ImageSet(tensor.contiguous(), torch.from_numpy(np.asarray(labels, np.int64)), num_classes, name)


def check_classes(data: ImageSet, num_classes: int | None) -> None:
    """DataError unless a conditional model (`num_classes` not None) has a class for every label of `data`, and
    every image has one."""
    if num_classes is None:
        return
    if data.num_classes == 0:
        raise DataError(f"model.num_classes: {num_classes} classes, but {data.name} has none (an imagefolder takes "
                        f"its classes from the sub-folders of data.root); sort the images into one sub-folder per "
                        f"class, or set model.num_classes=null")
    unlabelled = int((data.labels < 0).sum())
    if unlabelled:
        raise DataError(f"model.num_classes: {unlabelled} images of {data.name} lie directly in data.root, outside "
                        f"the class sub-folders; move them into one, or set model.num_classes=null")
    top = int(data.labels.max())
    if top >= num_classes:
        raise DataError(f"model.num_classes: {num_classes}, but {data.name} has labels up to {top}; set "
                        f"model.num_classes={max(top + 1, data.num_classes)}")


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition; RGB -> grey by ITU-R 601 luma (what PIL's convert('L') does)."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1)
    weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
    return ((images.to(torch.int32) * weights).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)


def fit_resolution(images: torch.Tensor, resolution: int, fit: str) -> torch.Tensor:
    """uint8 [N, C, h, w] -> [N, C, resolution, resolution]: zero-pad (then centre-crop) or bicubic resize."""
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    if fit == "resize":
        out = F.interpolate(images.float(), size=(resolution, resolution), mode="bicubic", antialias=True,
                            align_corners=False)
        return out.round().clamp(0, 255).to(torch.uint8)
    pad_h, pad_w = max(resolution - h, 0), max(resolution - w, 0)
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))  # 0 = black = -1
    top, left = (images.shape[-2] - resolution) // 2, (images.shape[-1] - resolution) // 2
    return images[..., top:top + resolution, left:left + resolution]


# ------------------------------------------------------------------------------------------------------------------
# training batches


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]; float latents are in model space already (float32, values kept)."""
    if images.is_floating_point():
        return images.to(torch.float32)
    return images.to(torch.float32) / 127.5 - 1.0


MEAN_IMAGE_CAP = 50_000
"""Images behind `mean_image` at most: larger sets use a seeded sample of this many (the same on every rank)."""


def mean_image(data: ImageSet, hflip: bool, cap: int = MEAN_IMAGE_CAP) -> torch.Tensor:
    """The training distribution's mean image [C, H, W] in model space, float32 on the CPU: the mean of the images
    in [-1, 1] (of a seeded sample of `cap` of them for larger sets), averaged with its mirror image when training
    flips (random flips make the distribution mirror-symmetric). Accumulated in float64, in a fixed order, so every
    process and every run on the same data gets the same bits."""
    images = data.images
    if len(images) > cap:
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:cap].sort().values
        images = images[chosen]
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    for start in range(0, len(images), 4096):
        total += images[start:start + 4096].to(torch.float64).sum(dim=0)
    scale, offset = (1.0, 0.0) if images.is_floating_point() else (127.5, 1.0)  # latents: model space already
    mean = total / (scale * len(images)) - offset
    if hflip:
        mean = (mean + mean.flip(-1)) / 2
    return mean.to(torch.float32)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of a tensor's bytes on the CPU: names a mean image in meta.json and logs."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (rounded), the inverse of to_model_space up to quantisation."""
    return ((samples.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


class BatchStream:
    """Endless seeded batches: a fresh permutation per epoch (seeded by seed and epoch, so the data position is two
    integers), flips drawn from the caller's generator. Batches are float [-1, 1] on `device`.

    The set lives on the GPU when `resident` (no host copy per step); otherwise batches are gathered on the CPU and
    copied (pinned, non-blocking). With `rows` (one process of several), every batch_size-image batch is drawn
    whole (order and flips) and only its rows `rows` are gathered and returned: the processes share it."""

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device, seed: int, hflip: bool,
                 resident: bool, rows: slice | None = None):
        self.batch_size, self.device, self.seed, self.hflip, self.rows = batch_size, device, seed, hflip, rows
        self.storage = device if resident else torch.device("cpu")
        self.images = data.images.to(self.storage)
        self.labels = data.labels.to(self.storage)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=generator).to(self.storage)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)

    def next(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, C, H, W] float in [-1, 1], [B] labels) on self.device; flips come from `generator`."""
        pieces = []
        needed = self.batch_size
        while needed:
            take = min(needed, len(self._order) - self.position)
            pieces.append(self._order[self.position:self.position + take])
            self.position += take
            needed -= take
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        index = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self.rows is not None:
            index = index[self.rows]
        images, labels = self.images[index], self.labels[index]
        if self.storage != self.device:  # pinned first: a non_blocking copy from pageable memory would block
            pinned = self.device.type == "cuda"
            images = (images.pin_memory() if pinned else images).to(self.device, non_blocking=pinned)
            labels = (labels.pin_memory() if pinned else labels).to(self.device, non_blocking=pinned)
        x = to_model_space(images)  # [B, C, H, W]
        if self.hflip:
            flip = torch.rand(self.batch_size, generator=generator, device=generator.device) < 0.5  # [B]
            if self.rows is not None:
                flip = flip[self.rows]
            x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x, labels


def fits_on_gpu(data: ImageSet, device: torch.device) -> bool:
    """True when the set (uint8 images, or float latents) takes under a quarter of the GPU's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return data.images.numel() * data.images.element_size() < free // 4
