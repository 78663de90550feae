"""Rebuild immiscible_cli/assets/fashion-mnist-10k-*.xz, the dataset behind `data.source: embedded`.

    python scripts/make_embedded_dataset.py [FASHION_MNIST_DIR]   (default /usr/share/datasets/fashion-mnist)

Takes the first 1,000 images of each class from the Fashion-MNIST train split (file order), interleaves them
class by class (0, 1, ..., 9, 0, 1, ...), and writes them as idx files (the format of the original) compressed with
xz. Deterministic: the same input gives the same bytes.
"""

import gzip
import lzma
import sys
from pathlib import Path

import numpy as np

PER_CLASS = 1000
src = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
dst = Path(__file__).resolve().parents[1] / "immiscible_cli" / "assets"


def read(name: str, header: int) -> tuple[bytes, np.ndarray]:
    path = src / f"{name}.gz"
    raw = gzip.open(path).read() if path.exists() else (src / name).read_bytes()
    return raw[:header], np.frombuffer(raw, np.uint8, offset=header)


_, images = read("train-images-idx3-ubyte", 16)
_, labels = read("train-labels-idx1-ubyte", 8)
images = images.reshape(-1, 28, 28)
per_class = [np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)]
order = np.stack(per_class, axis=1).reshape(-1)  # interleaved: image i has class i % 10
n = len(order)
img_header = np.array([0x00000803, n, 28, 28], dtype=">u4").tobytes()
lab_header = np.array([0x00000801, n], dtype=">u4").tobytes()
for name, payload in [("fashion-mnist-10k-images-idx3-ubyte.xz", img_header + images[order].tobytes()),
                      ("fashion-mnist-10k-labels-idx1-ubyte.xz", lab_header + labels[order].tobytes())]:
    (dst / name).write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    print(name, (dst / name).stat().st_size, "bytes")
