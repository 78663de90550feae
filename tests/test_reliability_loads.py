"""Untrusted inputs: CIFAR-10 batch pickles that would run code, and snapshots that do not fit their run (missing
keys, another network, an edited config.yaml), leftover temporary snapshot files."""

from __future__ import annotations

import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from typer.testing import CliRunner

from immiscible_cli import checkpoint, data as D, datasets, runs, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import DataConfig, load_config
from immiscible_cli.networks import build_network, expected_snapshot

runner = CliRunner()


# ------------------------------------------------------------------------------------------------------------------
# CIFAR-10 batches


class RunsCode:
    """Unpickling this creates `marker` (what a crafted batch file could do with any command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _short(text: bytes) -> bytes:  # SHORT_BINSTRING: a Python 2 str, bytes under encoding="bytes"
    return b"U" + bytes([len(text)]) + text


def py2_batch(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the official files are: Python 2 cPickle protocol 2, numpy.core names, str as BINSTRING."""
    n, width = images.shape
    dtype = (b"cnumpy\ndtype\n" + _short(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    raw = images.tobytes()
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _short(b"b") + b"\x87R"
             + b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width) + b"\x86" + dtype + b"\x89"
             + b"T" + struct.pack("<I", len(raw)) + raw + b"tb")
    return (b"\x80\x02}(" + _short(b"data") + array
            + _short(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
            + _short(b"batch_label") + _short(b"training batch 1 of 5")
            + _short(b"filenames") + b"](" + b"".join(_short(b"f%d.png" % i) for i in range(n)) + b"e" + b"u.")


def cifar_folder(root, per_batch: int = 3):
    """cifar-10-batches-py/ with every batch in the official format; returns the folder and the batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in datasets.CIFAR_FILES["train"] + datasets.CIFAR_FILES["test"]:
        images, labels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), [int(v) for v in
                                                                                     rng.integers(0, 10, per_batch)]
        (folder / name).write_bytes(py2_batch(images, labels))
        batches[name] = images, labels
    return folder, batches


def test_official_format_and_python3_pickles_load(tmp_path):
    folder, batches = cifar_folder(tmp_path)
    train = D.load_images(DataConfig(source="cifar10", root=str(tmp_path), channels=3))
    assert train.images.shape == (15, 3, 32, 32)
    assert torch.equal(train.images[3], torch.from_numpy(batches["data_batch_2"][0][0].reshape(3, 32, 32)))
    assert train.labels.tolist() == sum((batches[n][1] for n in datasets.CIFAR_FILES["train"]), [])
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in (2, 5):  # Python 3 writes bytes through _codecs.encode at protocol 2, buffers at 5
        batch = {b"batch_label": b"x", b"labels": [4, 9], b"data": images, b"filenames": [b"a.png", b"b.png"]}
        (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
        test = D.load_images(DataConfig(source="cifar10", root=str(tmp_path), channels=3, split="test"))
        assert test.labels.tolist() == [4, 9]
        assert torch.equal(test.images[1], torch.from_numpy(images[1].reshape(3, 32, 32)))


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_batch_that_would_run_code_is_refused_before_it_runs(tmp_path, protocol):
    folder, _ = cifar_folder(tmp_path)
    marker = tmp_path / "marker"
    crafted = pickle.dumps({b"data": RunsCode(marker), b"labels": [0]}, protocol=protocol)
    (folder / "data_batch_3").write_bytes(crafted)
    with pytest.raises(D.DataError) as caught:
        D.load_images(DataConfig(source="cifar10", root=str(tmp_path), channels=3))
    message = str(caught.value)
    assert message.startswith(str(folder / "data_batch_3")) and "posix.system" in message and "\n" not in message
    assert not marker.exists()
    pickle.loads(crafted)  # the file is a real threat: the plain unpickler runs the command
    assert marker.exists()


def test_train_on_a_crafted_batch_is_one_line_and_writes_nothing(tmp_path):
    folder, _ = cifar_folder(tmp_path / "data")
    marker = tmp_path / "marker"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": [RunsCode(marker)]}, protocol=2))
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "runs"), "--set", "data.source=cifar10",
                                 "--set", f"data.root={tmp_path / 'data'}", "--set", "data.channels=3", *sum(
                                     (["--set", item] for item in TINY), [])])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {folder / 'data_batch_1'}: not a readable CIFAR-10 batch")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_damaged_batches_name_the_file(tmp_path):
    folder, _ = cifar_folder(tmp_path)
    for payload in (b"garbage", pickle.dumps([1, 2, 3]), pickle.dumps({b"data": np.zeros(7, np.uint8),
                                                                        b"labels": [1]})):
        (folder / "test_batch").write_bytes(payload)
        with pytest.raises(D.DataError, match="test_batch: not a readable CIFAR-10 batch"):
            D.load_images(DataConfig(source="cifar10", root=str(tmp_path), channels=3, split="test"))


# ------------------------------------------------------------------------------------------------------------------
# snapshots that do not fit their run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with snapshots at 0.016 and 0.032 kimg (trained once; tests work on copies)."""
    return trainer.train(load_config("quickstart", TINY), out_root=tmp_path_factory.mktemp("trained"))


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained.path, tmp_path / "run")
    return runs.Run(tmp_path / "run")


def newest(run):
    return checkpoint.list_checkpoints(run)[-1].path


def rewrite_newest(run, change):
    state = torch.load(newest(run), weights_only=True)
    change(state)
    torch.save(state, newest(run))


def other_network(state):
    """The snapshot of a run with twice the channels, copied into this one."""
    other = load_config("quickstart", TINY + ["model.channels=16"])
    state["net"] = state["ema"] = build_network(other).state_dict()
    state["config"], state["config_digest"] = other.to_dict(), other.digest()


def sample_cli(run, *args):
    return runner.invoke(app, ["sample", str(run.path), "--num", "2", "--steps", "1", "--grid", "g.png",
                               "--device", "cpu", *args])


def eval_cli(run, *args):
    return runner.invoke(app, ["eval", str(run.path), "--fid", "--num-images", "4", "--steps", "1",
                               "--reference-images", "8", "--batch", "4", "--device", "cpu", *args])


def one_line_error(result) -> str:
    """The error line of a command that failed with exit code 2 (progress lines may come before it)."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.rstrip("\n").endswith(errors[0]), result.output
    return errors[0]


@pytest.mark.parametrize("change, needle", [
    (lambda state: state.pop("optimizer"), "keys missing: optimizer"),
    (other_network, "model.channels: 16 in the snapshot, 8 in config.yaml"),
    (lambda state: state["ema"].pop("conv_in.weight"), "ema: 1 tensors missing (conv_in.weight"),
])
def test_sample_and_eval_name_the_problem_and_the_usable_checkpoints(run, stub_fid, change, needle):
    rewrite_newest(run, change)
    for result in (sample_cli(run), eval_cli(run, "--ckpt", "latest")):
        message = one_line_error(result)
        assert f"{newest(run)}: does not fit this run" in message and needle in message
        assert "usable checkpoints of this run: 0.016 (pass one as --ckpt KIMG)" in message
    assert sample_cli(run, "--ckpt", "0.016").exit_code == 0
    assert not (run.path / "fid.jsonl").exists()  # eval stopped before scoring anything


def test_another_network_lists_its_tensor_shapes(run):
    rewrite_newest(run, other_network)
    with pytest.raises(checkpoint.CheckpointError, match=r"; net\.[\w.]+: \[64, 16\] in the snapshot, \[32, 8\] for "
                                                        r"config\.yaml; .*; \d+ more\)$"):
        checkpoint.load(newest(run), expected=expected_snapshot(run.config()))


def edit_config(run, section, field, value):
    raw = yaml.safe_load(run.config_path().read_text())
    raw[section][field] = value
    run.config_path().write_text(yaml.safe_dump(raw, sort_keys=False))


def test_an_edited_config_yaml_is_named_and_nothing_is_written(run, stub_fid):
    edit_config(run, "train", "total_kimg", 0.064)  # a field a resumed run may change: still fits
    assert sample_cli(run).exit_code == 0
    edit_config(run, "data", "root", "/moved/elsewhere")  # where and how it runs, not what the weights mean
    edit_config(run, "train", "compile", True)
    assert sample_cli(run).exit_code == 0
    edit_config(run, "model", "dropout", 0.2)  # same shapes, another network function
    for result in (sample_cli(run, "--ckpt", "0.016"), eval_cli(run)):
        message = one_line_error(result)
        assert "model.dropout: 0.1 in the snapshot, 0.2 in config.yaml" in message
        assert "no other checkpoint of this run fits config.yaml" in message
    before = {p.name: p.read_bytes() for p in run.checkpoints_dir().iterdir()}
    result = runner.invoke(app, ["train", "--resume", str(run.path)])
    message = one_line_error(result)
    assert "no usable checkpoint (2 skipped" in message and "restore config.yaml" in message
    assert {p.name: p.read_bytes() for p in run.checkpoints_dir().iterdir()} == before


def test_resume_falls_back_to_the_newest_snapshot_that_fits(run):
    rewrite_newest(run, other_network)
    foreign = newest(run)
    result = runner.invoke(app, ["train", "--resume", str(run.path), "--set", "train.total_kimg=0.048"])
    assert result.exit_code == 0, result.output
    assert f"skipping {foreign}: does not fit this run (model.channels" in result.output
    assert "resumed from snapshot-000000.016kimg.pt" in result.output
    expected = expected_snapshot(run.config())
    assert [c.kimg for c in checkpoint.usable(run, expected)] == [0.016, 0.032, 0.048]  # 0.032 written again


def test_leftover_temporary_snapshots_are_removed_on_the_next_start(run):
    folder = run.checkpoints_dir()
    leftover = folder / ".snapshot-000000.048kimg.pt.tmp-4242"
    leftover.write_bytes(b"half a snapshot")
    (folder / "notes.tmp-1").write_text("not ours")
    result = runner.invoke(app, ["train", "--resume", str(run.path)])  # already at total_kimg: nothing to train
    assert result.exit_code == 0, result.output
    assert f"removed {leftover.name}" in result.output
    assert not leftover.exists() and (folder / "notes.tmp-1").exists()
    assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [0.016, 0.032]
