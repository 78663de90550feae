"""File-system refusals and sizes that would exhaust memory: each is one `error:` line naming the path or the field,
exit 2 (a bad path) or 4 (the disk, memory), found before the expensive work, with nothing already written lost."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, only_error
from PIL import Image
from typer.testing import CliRunner

from immiscible_cli import evaluate, generation, networks, sampling, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.errors import EnvironmentFailure, OutOfMemory, UserError, is_out_of_memory, names_memory_field
from immiscible_cli.files import check_writable
from immiscible_cli.images import grid_image

runner = CliRunner()
LONG = "a" * 300



def refuse_writes_under(monkeypatch, folder, code=errno.EROFS, on="open"):
    """Make the file system refuse to create or write files under `folder` (root ignores chmod, so tests patch)."""
    real_open, real_write = os.open, os.write
    blocked: set[int] = set()

    def fake_open(path, flags, *args, **kwargs):
        if str(os.path.abspath(path)).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            if on == "open":
                raise OSError(code, os.strerror(code), str(path))
            fd = real_open(path, flags, *args, **kwargs)
            blocked.add(fd)
            return fd
        return real_open(path, flags, *args, **kwargs)

    def fake_write(fd, data):
        if fd in blocked:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return trainer.train(load_config("quickstart", TINY), out_root=tmp_path_factory.mktemp("runs"))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, with one FID row already in fid.jsonl."""
    path = shutil.copytree(trained_run.path, tmp_path / "run")
    (path / "fid.jsonl").write_text(json.dumps({"kimg": 0.016, "fid": 99.0}) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------------------
# check_writable


def test_check_writable_refuses_bad_paths_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("kept")
    cases = [(tmp_path / "folder", "file", "it is a folder, not a file"),
             (tmp_path / "file", "folder", "it is a file, not a folder"),
             (tmp_path / "file" / "x.png", "file", "file is a file, not a folder"),
             (tmp_path / f"{LONG}.png", "file", "longer than 255 bytes"),
             (tmp_path / LONG / "sub", "folder", "longer than 255 bytes")]
    for path, kind, needle in cases:
        with pytest.raises(UserError, match=needle) as caught:
            check_writable(path, kind, "--opt")
        assert caught.value.exit_code == 2 and str(caught.value).startswith(f"--opt {path}: ")
    before = sorted(os.listdir(tmp_path))
    check_writable(tmp_path / "new" / "deeper" / "grid.png", "file")  # folders on the way are the writer's job
    check_writable(tmp_path / "file", "file", append=True)
    check_writable(tmp_path / "out", "folder")
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "file").read_text() == "kept"


@pytest.mark.parametrize("code, on, needle", [(errno.EROFS, "open", "read-only"),
                                              (errno.ENOSPC, "write", "disk is full"),
                                              (errno.EACCES, "open", "permission denied")])
def test_check_writable_reports_the_disk_as_an_environment_failure(tmp_path, monkeypatch, code, on, needle):
    refuse_writes_under(monkeypatch, tmp_path, code, on)
    with pytest.raises(EnvironmentFailure, match=needle) as caught:
        check_writable(tmp_path / "grid.png", "file", "--grid")
    assert caught.value.exit_code == 4 and str(caught.value).startswith(f"--grid {tmp_path / 'grid.png'}: ")
    assert "\n" not in str(caught.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # the probe is gone even when its write failed


# ------------------------------------------------------------------------------------------------------------------
# sample: output paths, --grid, sizes


@pytest.mark.parametrize("make, args, needle", [
    (None, ["--grid", "x.jpg"], "--grid x.jpg: the grid is written as PNG"),
    ("dir", ["--grid", "d.png"], "--grid d.png: it is a folder, not a file"),
    ("file", ["--out", "f"], "--out f: it is a file, not a folder"),
    (None, ["--grid", f"{LONG}.png"], "longer than 255 bytes"),
    (None, ["--out", f"{LONG}/x"], "longer than 255 bytes"),
])
def test_sample_output_paths_are_checked_before_any_image(trained_run, tmp_path, monkeypatch, make, args, needle):
    if make == "dir":
        (tmp_path / "d.png").mkdir()
    elif make == "file":
        (tmp_path / "f").write_text("kept")
    monkeypatch.setattr(sampling, "load_network", lambda *a, **k: pytest.fail("the network was loaded"))
    result = runner.invoke(app, ["sample", str(trained_run.path), "--num", "2", *args])
    assert result.exit_code == 2
    assert needle in only_error(result)


def test_sample_into_a_read_only_folder_fails_before_sampling(trained_run, tmp_path, monkeypatch):
    refuse_writes_under(monkeypatch, tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(sampling, "load_network", lambda *a, **k: pytest.fail("the network was loaded"))
    result = runner.invoke(app, ["sample", str(trained_run.path), "--num", "2", "--out", "ro/imgs"])
    assert result.exit_code == 4
    assert "--out ro/imgs: the file system is read-only" in only_error(result)


def test_sample_files_and_grid_hold_what_generate_makes(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "GRID_MAX", 2)
    result = runner.invoke(app, ["sample", str(trained_run.path), "--seeds", "3-5,9", "--out", "imgs", "--grid",
                                 "g.png", "--steps", "2", "--batch", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote g.png (the first 2 of 4 images)" in result.output
    net, cfg, _, _ = networks.load_network(trained_run, "latest", True, torch.device("cpu"))
    expected = generation.generate(net, cfg, [3, 4, 5, 9], sampler=cfg.sample.sampler, steps=2, batch=3)
    for seed, image in zip([3, 4, 5, 9], expected):
        saved = torch.from_numpy(np.array(Image.open(tmp_path / "imgs" / f"seed{seed:06d}.png")))
        assert torch.equal(saved, image[0])  # 1 channel: PNG mode L
    grid = np.array(Image.open(tmp_path / "g.png"))
    assert (grid == grid_image(expected[:2])[:, :, 0]).all()


def test_sample_batches_are_made_only_when_asked_for(tiny):
    cfg = load_config("quickstart", tiny)
    net = generation.CountingNet(networks.build_network(cfg).eval())
    batches = sampling.sample_batches(net, cfg, sampling.parse_seeds(None, 1_000_000_000), batch=4,
                                      sampler="euler", steps=2)
    assert net.calls == 0
    first = list(itertools.islice(batches, 2))
    assert net.calls == 4  # two batches of two Euler steps, of the billion asked for
    assert [seeds for seeds, _ in first] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    together = generation.generate(net, cfg, list(range(8)), sampler="euler", steps=2, batch=4)
    assert torch.equal(torch.cat([images for _, images in first]), together)


def test_huge_seed_ranges_are_not_listed():
    seeds = sampling.parse_seeds("0-999999999999", None)
    assert len(seeds) == 10**12 and seeds[10**12 - 1] == 999999999999 and seeds[-2] == 999999999998
    mixed = sampling.parse_seeds("7,2-4,18446744073709551615", None)
    assert mixed == [7, 2, 3, 4, 2**64 - 1] and list(mixed) == [7, 2, 3, 4, 2**64 - 1] and mixed[1:3] == [2, 3]
    with pytest.raises(UserError, match="0..2"):
        sampling.parse_seeds("0-18446744073709551616", None)


def test_sample_of_a_billion_images_writes_as_it_goes_and_keeps_them_when_the_disk_fills(trained_run, tmp_path,
                                                                                        monkeypatch):
    real, calls = sampling.save_each, []

    def fills_up(images, names, folder):
        calls.append(len(names))
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / names[0]))
        real(images, names, folder)

    monkeypatch.setattr(sampling, "save_each", fills_up)
    result = runner.invoke(app, ["sample", str(trained_run.path), "--num", "1000000000", "--out", "imgs",
                                 "--steps", "1", "--batch", "2"])
    assert result.exit_code == 4
    assert "imgs/seed000006.png: the disk is full" in only_error(result)
    assert calls == [2, 2, 2, 2]  # it stopped at the failure: no image beyond the fourth batch was made
    kept = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert kept == [f"seed{s:06d}.png" for s in range(6)]
    assert all(Image.open(tmp_path / "imgs" / name).size == (16, 16) for name in kept)


def test_a_disk_that_fills_during_a_write_names_the_file(tmp_path, monkeypatch):
    from immiscible_cli.errors import describe_os_error
    from immiscible_cli.images import save_png

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() and fsync() report it: no file name

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        save_png(np.zeros((4, 4, 1), np.uint8), tmp_path / "imgs" / "a.png")
    assert str(describe_os_error(caught.value)) == f"{tmp_path / 'imgs' / 'a.png'}: the disk is full; free space " \
                                                   f"and run the command again"
    assert os.listdir(tmp_path / "imgs") == []  # no temporary file left behind


def test_a_grid_of_a_huge_seed_range_makes_only_its_images(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "GRID_MAX", 4)
    result = runner.invoke(app, ["sample", str(trained_run.path), "--seeds", "0-999999999999", "--grid", "g.png",
                                 "--steps", "1", "--batch", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote g.png (the first 4 of 1000000000000 images)" in result.output
    assert Image.open(tmp_path / "g.png").size == (32, 32)
    monkeypatch.undo()
    words = " ".join(runner.invoke(app, ["sample", "--help"]).output.replace("│", " ").split())
    assert f"the first {sampling.GRID_MAX} at most" in words  # the help says so


# ------------------------------------------------------------------------------------------------------------------
# out of memory


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_names_the_field_and_nothing_else():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"))
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))
    with pytest.raises(OutOfMemory, match=r"^out of memory while x; lower --batch \(now 8\)$") as caught:
        with names_memory_field("--batch", 8, "while x"):
            oom()
    assert caught.value.exit_code == 4
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with names_memory_field("--batch", 8):
            raise RuntimeError("shape mismatch")


def test_sample_out_of_memory_names_batch(trained_run, tmp_path, monkeypatch):
    real = sampling.load_network

    def boom(*args, **kwargs):
        net, *rest = real(*args, **kwargs)
        net.forward = oom
        return (net, *rest)

    monkeypatch.setattr(sampling, "load_network", boom)
    result = runner.invoke(app, ["sample", str(trained_run.path), "--num", "3", "--grid", "g.png"])
    assert result.exit_code == 4
    default = trained_run.config().sample.batch_size
    assert only_error(result) == (f"error: out of memory while sampling; lower --batch (now {default}, the run's "
                                  f"sample.batch_size)")
    given = runner.invoke(app, ["sample", str(trained_run.path), "--num", "3", "--grid", "g.png", "--batch", "2"])
    assert "lower --batch (now 2)" in only_error(given) and not (tmp_path / "g.png").exists()


def test_train_out_of_memory_names_train_batch_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.TrainingLoop, "net_fn", oom)
    result = runner.invoke(app, ["train", "--out", "runs", *[a for s in TINY for a in ("--set", s)]])
    assert result.exit_code == 4
    assert "Traceback" not in result.output  # the run's header line comes first, then the one error line
    assert result.output.splitlines()[-1] == ("error: out of memory in a training step; lower train.batch_gpu (now 8; "
                                              "a divisor of 8, the images of a step on each process)")
    assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1


def test_an_unnamed_out_of_memory_is_one_line(trained_run, monkeypatch):
    monkeypatch.setattr(sampling, "load_network", oom)
    result = runner.invoke(app, ["sample", str(trained_run.path), "--num", "1", "--grid", "g.png"])
    assert result.exit_code == 4 and "out of memory; lower the batch size" in only_error(result)


# ------------------------------------------------------------------------------------------------------------------
# train, eval, compare, study: checked before the work


def test_train_into_a_read_only_folder_fails_before_the_reference_statistics(tmp_path, monkeypatch):
    from immiscible_cli.metrics import scorer

    (tmp_path / "ro").mkdir()
    refuse_writes_under(monkeypatch, tmp_path / "ro")
    monkeypatch.setattr(scorer, "training_scorer", lambda *a, **k: pytest.fail("work started"))
    result = runner.invoke(app, ["train", "--out", "ro/runs", *[a for s in TINY for a in ("--set", s)]])
    assert result.exit_code == 4
    assert "--out ro/runs: the file system is read-only" in only_error(result)
    (tmp_path / "file").write_text("kept")
    not_a_folder = runner.invoke(app, ["train", "--out", "file", *[a for s in TINY for a in ("--set", s)]])
    assert not_a_folder.exit_code == 2 and "--out file: it is a file, not a folder" in only_error(not_a_folder)
    assert (tmp_path / "file").read_text() == "kept"


@pytest.mark.parametrize("code, on, needle", [(errno.EROFS, "open", "the file system is read-only"),
                                              (errno.ENOSPC, "write", "the disk is full")])
def test_eval_of_a_read_only_run_fails_before_scoring_and_keeps_its_rows(run_copy, monkeypatch, code, on, needle):
    before = (run_copy / "fid.jsonl").read_bytes()
    refuse_writes_under(monkeypatch, run_copy, code, on)
    monkeypatch.setattr(evaluate, "FIDExtractor", lambda *a, **k: pytest.fail("scoring started"))
    result = runner.invoke(app, ["eval", str(run_copy), "--fid"])
    assert result.exit_code == 4
    assert only_error(result) == f"error: {run_copy / 'fid.jsonl'}: {needle}" + (
        "; choose a writable folder" if code == errno.EROFS else "; free space and run the command again")
    assert (run_copy / "fid.jsonl").read_bytes() == before


def test_eval_out_of_memory_names_batch(run_copy, monkeypatch, stub_fid):
    monkeypatch.setattr(evaluate.FIDScorer, "score", oom)
    before = (run_copy / "fid.jsonl").read_bytes()
    result = runner.invoke(app, ["eval", str(run_copy), "--fid", "--num-images", "4", "--reference-images", "8",
                                 "--batch", "4", "--steps", "1"])
    assert result.exit_code == 4, result.output
    assert "error: out of memory while scoring FID; lower --batch (now 4)" in result.output
    assert "Traceback" not in result.output and (run_copy / "fid.jsonl").read_bytes() == before


def test_compare_plot_onto_a_folder(tmp_path):
    (tmp_path / "p.png").mkdir()
    result = runner.invoke(app, ["compare", "a", "b", "--plot", "p.png"])
    assert result.exit_code == 2 and "--plot p.png: it is a folder, not a file" in only_error(result)


def test_study_folder_that_is_a_file(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "preset": "quickstart", "set": TINY, "seeds": [0],
                                     "baseline": "a", "runs": {"a": {}, "b": {"set": ["assigner.name=knn"]}}}))
    (tmp_path / "taken").write_text("kept")
    result = runner.invoke(app, ["study", str(study), "--out", "taken"])
    assert result.exit_code == 2 and "--out taken: it is a file, not a folder" in only_error(result)


# ------------------------------------------------------------------------------------------------------------------
# binary presets and config files


@pytest.mark.parametrize("content, needle", [(bytes(range(128, 256)), "byte 0 is not UTF-8"),
                                             (b"data:\n  source: \x00embedded\n", "character 17 is a control")])
def test_a_binary_preset_or_study_file_is_one_line(tmp_path, content, needle):
    (tmp_path / "bin.yaml").write_bytes(content)
    for args in (["presets", "show", "bin.yaml"], ["train", "--preset", "bin.yaml", "--dry-run"],
                 ["study", "bin.yaml", "--dry-run"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert only_error(result) == f"error: bin.yaml: not a text file ({needle}" + (
            "); give a YAML file" if "UTF-8" in needle else " character YAML does not allow); give a YAML file")
