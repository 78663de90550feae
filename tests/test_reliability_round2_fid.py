"""FID reference statistics keyed by their content and checked when read (issue 25, item 9): two image folders with
one name and count, pad versus resize, grey versus colour get different statistics; a cached file whose numbers were
changed (NaN, a well-formed wrong mu) is found out and computed again; statistics cached before content keys (the
committed Fashion-MNIST file) stay usable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, StubNetwork
from PIL import Image

from immiscible_cli.config import load_config
from immiscible_cli.metrics import FIDExtractor, FIDReferenceError, ReferenceKey, WeightsInfo, cleanfid_reference
from immiscible_cli.metrics import reference
from immiscible_cli.metrics.reference import reference_stats, stats_digest
from immiscible_cli.metrics.scorer import FIDScorer

STUB_INFO = WeightsInfo("stub", "", "0" * 64, "float32")
SHIPPED = (Path(__file__).parent.parent / "docs" / "results" / "fashion-mnist" / "reference" /
           "fashion-mnist_train_28px_clean_n60000_w7ff4a85c3a63-fp32.npz")


def extractor() -> FIDExtractor:
    return FIDExtractor("clean", "cpu", batch_size=8, network=StubNetwork(), info=STUB_INFO)


def folder(root: Path, seed: int, count: int = 6) -> Path:
    """`root`/imgs with `count` random 12 x 10 colour PNGs."""
    path = root / "imgs"
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def scorer_for(root: Path, *extra: str) -> FIDScorer:
    cfg = load_config("quickstart", TINY + ["data.source=imagefolder", f"data.root={root}", "data.resolution=8",
                                            *extra])
    return FIDScorer(cfg, torch.device("cpu"), num_images=4, batch=8, extractor=extractor())


def test_two_folders_with_one_name_and_count_get_their_own_statistics(tmp_path):
    a, b = scorer_for(folder(tmp_path / "A", 1)), scorer_for(folder(tmp_path / "B", 2))
    assert a.ref_info["name"] == b.ref_info["name"] == "imagefolder-imgs"
    assert a.ref_info["num_images"] == b.ref_info["num_images"] == 6
    assert a.ref_info["file"] != b.ref_info["file"]
    assert not np.allclose(a.ref_mu, b.ref_mu)
    again = scorer_for(tmp_path / "A" / "imgs")  # the same images: the cached file is found again
    assert again.ref_info["file"] == a.ref_info["file"]
    np.testing.assert_array_equal(again.ref_mu, a.ref_mu)


def test_fit_channels_and_changed_images_change_the_key(tmp_path):
    path = folder(tmp_path / "A", 1)
    files = {scorer_for(path, "data.channels=1").ref_info["file"], scorer_for(path, "data.channels=3").ref_info["file"]}
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(path / "0.png")  # same count, other images
    files.add(scorer_for(path, "data.channels=3").ref_info["file"])
    assert len(files) == 3
    embedded = []  # a named dataset off its native 28 px: pad and resize give other images, so other statistics
    for fit in ("pad", "resize"):
        cfg = load_config("quickstart", TINY + [f"data.fit={fit}", "eval.reference_images=16"])
        embedded.append(FIDScorer(cfg, torch.device("cpu"), num_images=4, batch=8, extractor=extractor()))
    assert embedded[0].ref_info["file"] != embedded[1].ref_info["file"]
    assert not np.allclose(embedded[0].ref_mu, embedded[1].ref_mu)


def test_named_datasets_at_native_shape_keep_their_name_and_the_committed_file_still_reads():
    shipped_key = ReferenceKey("fashion-mnist", "train", 28, "clean", 60000, "7ff4a85c3a6378f0", "float32",
                               content="ab" * 32)
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    native = ReferenceKey.for_extractor("fashion-mnist", "train", 28, 2, extractor(), images, "fashion-mnist")
    padded = ReferenceKey.for_extractor("fashion-mnist", "train", 32, 2, extractor(),
                                        torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "fashion-mnist")
    assert not native.content_in_name and "_d" not in native.filename().rsplit("-", 1)[-1]
    assert padded.filename().endswith(f"_d{padded.content[:12]}.npz")
    assert shipped_key.filename() == SHIPPED.name
    if not SHIPPED.is_file():
        pytest.skip("the committed statistics are not in this checkout")
    found = reference._read(SHIPPED, shipped_key)  # written before checksums: accepted, its fields match
    assert found is not None and found[0].shape == (2048,) and found[1].shape == (2048, 2048)


def _cached(tmp_path):
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ex = extractor()
    key = ReferenceKey.for_extractor("imagefolder-imgs", "train", 8, 6, ex, images, "imagefolder")
    calls = []

    def batches():
        calls.append(1)
        return iter([images])

    mu, sigma = reference_stats(key, batches, ex, cache_dir=tmp_path)
    return key, batches, ex, calls, tmp_path / "fid-stats" / key.filename(), mu, sigma


@pytest.mark.parametrize("damage", ["mu_nan", "sigma_nan", "wrong_mu", "no_checksum", "wrong_shape", "other_images"])
def test_a_cached_file_that_fails_its_checks_is_reported_and_computed_again(tmp_path, capsys, damage):
    key, batches, ex, calls, path, mu, sigma = _cached(tmp_path)
    with np.load(path) as stats:
        fields = {name: stats[name] for name in stats.files}
    if damage == "mu_nan":
        fields["mu"] = np.full_like(mu, np.nan)
    elif damage == "sigma_nan":
        fields["sigma"] = np.full_like(sigma, np.nan)
    elif damage == "wrong_mu":
        fields["mu"] = mu + 1.0  # well-formed, finite: only the checksum tells
    elif damage == "no_checksum":
        del fields["stats_sha256"]
    elif damage == "wrong_shape":
        fields["sigma"] = sigma[:-1]
    else:
        fields["content"] = np.asarray("cd" * 32)
        fields["stats_sha256"] = np.asarray(stats_digest(fields["mu"], fields["sigma"]))
    np.savez(path, **fields)
    mu2, sigma2 = reference_stats(key, batches, ex, cache_dir=tmp_path)
    assert calls == [1, 1]  # computed again
    assert "warning: " in capsys.readouterr().err
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    reference_stats(key, lambda: pytest.fail("a repaired file is read, not computed"), ex, cache_dir=tmp_path)


def test_clean_fid_statistics_with_nan_are_refused_in_one_line(tmp_path):
    (tmp_path / "cleanfid-stats").mkdir()
    np.savez(tmp_path / "cleanfid-stats" / "cifar10_clean_test_32.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    with pytest.raises(FIDReferenceError, match="NaN") as err:
        cleanfid_reference("test", "clean", cache_dir=tmp_path)
    assert "\n" not in str(err.value)
