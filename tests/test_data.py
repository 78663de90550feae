"""Data sources on fake trees in their real layouts, the embedded set, and the seeded batch stream."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from immiscible_cli import data as D, datasets
from immiscible_cli.config import DataConfig


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def fake_fashion(folder, split: str, n: int, compress: bool, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


def test_fashion_mnist_debian_layout_gz(tmp_path, monkeypatch):
    images, labels = fake_fashion(tmp_path / "debian", "test", 12, compress=True)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "debian")  # looked up when no root is given
    out = D.load_images(DataConfig(source="fashion-mnist", split="test", resolution=32, fit="pad"))
    assert out.images.shape == (12, 1, 32, 32) and out.images.dtype == torch.uint8
    assert torch.equal(out.images[:, 0, 2:30, 2:30], torch.from_numpy(images.astype(np.uint8)))
    assert out.images[:, :, :2].max() == 0  # padding is the black background
    assert torch.equal(out.labels, torch.from_numpy(labels))


def test_fashion_mnist_torchvision_raw_layout_only_split_in_use(tmp_path):
    images, _ = fake_fashion(tmp_path / "FashionMNIST" / "raw", "train", 8, compress=False)
    out = D.load_images(DataConfig(source="fashion-mnist", root=str(tmp_path), channels=3, fit="resize",
                                   resolution=16))
    assert out.images.shape == (8, 3, 16, 16)
    assert torch.equal(out.images[:, 0], out.images[:, 2])  # grey repeated to RGB


def offline(*args, **kwargs):
    """Stands in for a torchvision dataset class whose download fails (no network)."""
    raise OSError("network unreachable")


def test_fashion_mnist_missing_offline_gives_both_ways(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(D.DataError, match="apt-get install dataset-fashion-mnist.*data.root"):
        D.load_images(DataConfig(source="fashion-mnist", root=str(tmp_path)))


def fake_cifar(root, per_batch: int = 4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, per_batch))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"x"] * 10}, f)
    return batches


def test_cifar10_pickled_batches(tmp_path):
    batches = fake_cifar(tmp_path)
    train = D.load_images(DataConfig(source="cifar10", root=str(tmp_path), channels=3))
    assert train.images.shape == (20, 3, 32, 32)
    first = torch.from_numpy(batches["data_batch_1"][0][0].reshape(3, 32, 32))
    assert torch.equal(train.images[0], first)  # CHW pickles -> [C, H, W] unchanged
    test = D.load_images(DataConfig(source="cifar10", root=str(tmp_path), channels=3, split="test"))
    assert test.images.shape == (4, 3, 32, 32) and test.labels.tolist() == list(batches["test_batch"][1])
    grey = D.load_images(DataConfig(source="cifar10", root=str(tmp_path), channels=1, split="test"))
    assert grey.images.shape == (4, 1, 32, 32)


def test_cifar10_missing_offline_gives_both_ways(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(D.DataError, match="cifar-10-batches-py/ or cifar-10-python.tar.gz"):
        D.load_images(DataConfig(source="cifar10", root=str(tmp_path)))


def test_imagefolder_labels_crop_and_resize(tmp_path):
    for klass, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / "imgs" / klass).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 20), colour).save(tmp_path / "imgs" / klass / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out = D.load_images(DataConfig(source="imagefolder", root=str(tmp_path / "imgs"), channels=3, resolution=16))
    assert out.images.shape == (4, 3, 16, 16) and out.num_classes == 2
    assert out.labels.tolist() == [0, 0, 1, 1]
    assert out.images[0, 0].min() == 255 and out.images[3, 2].min() == 255
    with pytest.raises(D.DataError, match="data.root"):
        D.load_images(DataConfig(source="imagefolder", root=str(tmp_path / "empty-or-missing")))


def test_embedded_set():
    out = D.load_images(DataConfig())
    assert out.images.shape == (10_000, 1, 32, 32) and out.images.dtype == torch.uint8
    assert torch.bincount(out.labels).tolist() == [1000] * 10
    assert out.images.max() == 255 and out.images[:, :, :2].max() == 0
    assert (datasets.ASSETS / "LICENSE-fashion-mnist").read_text().count("MIT") >= 1
    size = sum(p.stat().st_size for p in datasets.ASSETS.glob("*.xz"))
    assert size < 5 * 2**20


def test_idx_reader_rejects_damage(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, np.zeros((3, 4, 4)), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(D.DataError, match="truncated"):
        datasets.read_idx(path)
    path.write_bytes(b"garbage!")
    with pytest.raises(D.DataError, match="not an idx file"):
        datasets.read_idx(path)


def test_batch_stream_is_seeded_resumable_and_in_range():
    images = D.ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
                        torch.arange(10), 10, "toy")
    make = lambda: D.BatchStream(images, 4, torch.device("cpu"), seed=3, hflip=True, resident=False)  # noqa: E731
    a, gen_a = make(), torch.Generator().manual_seed(0)
    seen = [a.next(gen_a)[1] for _ in range(5)]  # 20 images: crosses two epoch boundaries
    assert sorted(torch.cat(seen[:2] + [seen[2][:2]]).tolist()) == list(range(10))  # each image once per epoch
    b, gen_b = make(), torch.Generator().manual_seed(0)
    for _ in range(3):
        b.next(gen_b)
    state, gen_state = b.state_dict(), gen_b.get_state()
    c, gen_c = make(), torch.Generator()
    c.load_state_dict(state)
    gen_c.set_state(gen_state)
    x_b, y_b = b.next(gen_b)
    x_c, y_c = c.next(gen_c)
    assert torch.equal(x_b, x_c) and torch.equal(y_b, y_c) and torch.equal(y_b, seen[3])
    assert x_b.min() >= -1 and x_b.max() <= 1 and x_b.dtype == torch.float32
    assert torch.allclose(D.to_model_space(D.to_uint8(x_b)), x_b)


def test_the_source_registry_holds_every_image_source_of_the_config():
    from typing import get_args

    choices = get_args(DataConfig.model_fields["source"].annotation)
    assert tuple(datasets.SOURCES) + ("latents",) == choices  # latents: VAE latents of a dataset (latents.py)
    assert [name for name, source in datasets.SOURCES.items() if len(source.splits) > 1] == ["fashion-mnist", "cifar10"]
    assert [name for name, source in datasets.SOURCES.items() if source.crops_and_resizes] == ["imagefolder"]
