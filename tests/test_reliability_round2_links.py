"""Symlinks, FIFOs and foreign folders (issue 25, item 6): a run never writes, repairs or locks through a symlink
that leaves its folder, never opens a non-regular file as a checkpoint, log or lock, and never adopts a folder it did
not create. Each refusal is one `error:` line naming the file, exit 2, with the outside file untouched."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
from conftest import TINY, only_error
from typer.testing import CliRunner

from immiscible_cli import checkpoint, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.files import ForeignFileError, append_jsonl, check_own_file, own_file_problem, repair_jsonl
from immiscible_cli.run_create import check_new_run_dir, create_run_at
from immiscible_cli.runs import Run, RunError

runner = CliRunner()
SETS = [a for s in TINY for a in ("--set", s)]



@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return trainer.train(load_config("quickstart", TINY), out_root=tmp_path_factory.mktemp("runs"))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return shutil.copytree(trained_run.path, tmp_path / "run")


@pytest.fixture
def outside(tmp_path):
    """A file outside the run whose last line lacks its newline (what the partial-line repair would cut)."""
    path = tmp_path / "outside.txt"
    path.write_bytes(b"keep me\nno newline here")
    return path


# --- the helper ---------------------------------------------------------------------------------------------------


def test_own_file_problem_tells_links_out_fifos_and_folders_from_own_files(tmp_path, outside):
    run = tmp_path / "r"
    run.mkdir()
    (run / "plain").write_text("x")
    (run / "inside").symlink_to(run / "plain")
    (run / "out").symlink_to(outside)
    (run / "dangling").symlink_to(run / "not-yet")
    os.mkfifo(run / "fifo")
    (run / "dir").mkdir()
    assert own_file_problem(run / "plain") is None
    assert own_file_problem(run / "missing") is None
    assert own_file_problem(run / "inside") is None
    assert own_file_problem(run / "dangling") is None
    assert "symlink to" in own_file_problem(run / "out") and "outside" in own_file_problem(run / "out")
    assert "FIFO" in own_file_problem(run / "fifo")
    assert "folder" in own_file_problem(run / "dir")
    with pytest.raises(ForeignFileError, match="out: it is a symlink"):
        check_own_file(run / "out")


def test_jsonl_writers_never_cut_or_append_through_a_link_out(tmp_path, outside):
    (tmp_path / "r").mkdir()
    link = tmp_path / "r" / "metrics.jsonl"
    link.symlink_to(outside)
    before = outside.read_bytes()
    with pytest.raises(ForeignFileError):
        repair_jsonl(link)
    with pytest.raises(ForeignFileError):
        append_jsonl(link, {"kimg": 1.0})
    assert outside.read_bytes() == before


# --- the commands ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fid.jsonl", "log.txt", "train.lock", "metrics.jsonl"])
def test_resume_refuses_run_files_linked_outside_and_leaves_the_outside_file(run_copy, outside, name):
    (run_copy / name).unlink(missing_ok=True)
    (run_copy / name).symlink_to(outside)
    before = outside.read_bytes()
    result = runner.invoke(app, ["train", "--resume", str(run_copy), "--set", "train.total_kimg=0.048"])
    line = only_error(result)
    assert result.exit_code == 2 and name in line and "symlink" in line
    assert outside.read_bytes() == before


def test_eval_refuses_fid_jsonl_linked_outside(run_copy, outside, stub_fid):
    (run_copy / "fid.jsonl").symlink_to(outside)
    outside.write_text("")  # an empty outside file: eval would have appended rows to it
    result = runner.invoke(app, ["eval", str(run_copy), "--fid", "--num-images", "8", "--reference-images", "16"])
    line = only_error(result)
    assert result.exit_code == 2 and "fid.jsonl" in line
    assert outside.read_text() == ""


def test_a_fifo_as_the_newest_checkpoint_is_refused_not_opened(run_copy):
    newest = checkpoint.list_checkpoints(Run(run_copy))[-1].path
    fifo = newest.with_name("snapshot-000099.000kimg.pt")
    os.mkfifo(fifo)
    done = {}

    def sample():
        done["result"] = runner.invoke(app, ["sample", str(run_copy), "--num", "1", "--out", "imgs"])

    worker = threading.Thread(target=sample, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # it blocked on the FIFO: open it for writing to release the reader, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail("sample opened the FIFO")
    line = only_error(done["result"])
    assert done["result"].exit_code == 2 and "FIFO" in line and fifo.name in line


def test_a_checkpoint_linked_to_a_system_file_is_not_parsed_and_resume_falls_back(run_copy, tmp_path):
    target = tmp_path / "system-file"
    target.write_bytes(b"\x80\x04K\x01.")  # a valid pickle: a link-following loader would parse it
    newest = checkpoint.list_checkpoints(Run(run_copy))[-1]
    fake = newest.path.with_name("snapshot-000099.000kimg.pt")
    fake.symlink_to(target)
    with pytest.raises(checkpoint.CheckpointError, match="symlink to"):
        checkpoint.load(fake)
    loaded = checkpoint.load_newest(Run(run_copy))
    assert loaded.checkpoint.path == newest.path and "symlink to" in loaded.skipped[0]


def test_run_dir_never_adopts_a_folder_holding_another_tools_meta_json(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"tool": "other", "version": 3}))
    with pytest.raises(RunError, match="not a run of ours"):
        check_new_run_dir(folder)
    result = runner.invoke(app, ["train", "--run-dir", str(folder), *SETS])
    assert result.exit_code == 2 and "meta.json" in only_error(result)
    assert json.loads((folder / "meta.json").read_text()) == {"tool": "other", "version": 3}


def test_run_dir_still_completes_a_half_made_run_of_ours(tmp_path):
    folder = tmp_path / "ours"
    cfg = load_config("quickstart", TINY)
    create_run_at(folder, cfg)
    (folder / "config.yaml").unlink()  # a crash between meta.json and config.yaml
    check_new_run_dir(folder)  # accepted: the meta.json is ours
