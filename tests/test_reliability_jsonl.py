"""A run's JSONL files after a crash mid-write, rows that do not fit, two evals of one run, and --run-dir into a
folder that is not a run (issue 12, kinds 1 and 6)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from compare_fakes import make_run
from conftest import TINY, StubNetwork, train_with_fid
from typer.testing import CliRunner

from immiscible_cli import evaluate, files, run_create, runs, study
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.errors import UserError
from immiscible_cli.metrics import FIDExtractor, WeightsInfo, scorer
from immiscible_cli.runs import append_fid_row, read_fid_rows

runner = CliRunner()
FID_SET = ["eval.every_kimg=0.016", "eval.num_images=6", "eval.steps=2", "eval.reference_images=10",
           "eval.batch_size=4"]
CUT_ROWS = [b'{"kimg": 2.0, "step": 4, "lo', b"\x00" * 40]  # a row cut mid-write; a tail a power loss zeroed


def cli(*args: str):
    result = runner.invoke(app, [*map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def cut_off(path: Path, tail: bytes) -> bytes:
    """Leave `tail` behind the last whole line, as a crash mid-append does; the file's bytes after."""
    with open(path, "ab") as f:
        f.write(tail)
    return path.read_bytes()


def damaged(path: Path) -> Path:
    return path.with_name(path.name + files.DAMAGED)


# --- a crash mid-append --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", CUT_ROWS)
def test_the_next_append_moves_a_cut_off_last_line_aside(tmp_path, capsys, tail):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    metrics = run.path / runs.METRICS
    run.append_metrics({"kimg": 1.0, "loss": 0.5})
    before = cut_off(metrics, tail)
    assert [m["kimg"] for m in run.metrics()] == [1.0]  # the cut-off line is ignored ...
    warning = capsys.readouterr().err
    assert str(metrics) in warning and "line 2 is cut off" in warning and len(warning.splitlines()) == 1
    assert metrics.read_bytes() == before and not damaged(metrics).exists()  # ... and reading wrote nothing
    run.append_metrics({"kimg": 3.0, "loss": 0.3})
    assert [(m["kimg"], m["loss"]) for m in run.metrics()] == [(1.0, 0.5), (3.0, 0.3)]  # both whole rows
    assert damaged(metrics).read_bytes() == tail + b"\n"  # what was cut is kept
    assert str(metrics) in capsys.readouterr().err  # the writer said so


def test_fid_rows_survive_a_cut_off_line_too(tmp_path):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    append_fid_row(run, {"kimg": 1.0, "fid": 50.0, "num_images": 6})
    cut_off(run.fid_path(), b'{"kimg": 2.0, "fid": 4')
    append_fid_row(run, {"kimg": 2.0, "fid": 40.0, "num_images": 6})
    assert [r["fid"] for r in read_fid_rows(run)] == [50.0, 40.0]
    assert damaged(run.fid_path()).read_bytes() == b'{"kimg": 2.0, "fid": 4\n'


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"kimg": 1.0}')  # written by hand, say
    assert files.read_jsonl(path) == [{"kimg": 1.0}]
    files.append_jsonl(path, {"kimg": 2.0})
    assert files.read_jsonl(path) == [{"kimg": 1.0}, {"kimg": 2.0}] and not damaged(path).exists()


def test_resume_truncation_keeps_the_cut_off_line(tmp_path):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    for kimg in (1.0, 2.0, 3.0):
        run.append_metrics({"kimg": kimg})
    cut_off(run.path / runs.METRICS, b'{"kimg": 4.0, "lo')
    assert run.truncate_after(2.0) == 1
    assert [m["kimg"] for m in run.metrics()] == [1.0, 2.0]
    assert damaged(run.path / runs.METRICS).read_bytes() == b'{"kimg": 4.0, "lo\n'


# --- rows that parse but do not fit --------------------------------------------------------------------------------


@pytest.mark.parametrize("line, problem", [
    ("[1.0, 2.0]", "line 2 is not a JSON object"),
    ('{"kimg": "2.0", "loss": 0.4}', "line 2: 'kimg' is \"2.0\", expected a number"),
    ('{"loss": 0.4}', "line 2: the row has no 'kimg'"),
    ('{"kimg": 2.0, "img_per_s": true}', "line 2: 'img_per_s' is true, expected a number"),
])
def test_a_metrics_row_that_does_not_fit_names_file_and_line(tmp_path, line, problem):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    (run.path / runs.METRICS).write_text(json.dumps({"kimg": 1.0}) + "\n" + line + "\n" + '{"kimg": 3.0}\n')
    with pytest.raises(UserError) as caught:
        run.metrics()
    assert str(caught.value).startswith(f"{run.path / runs.METRICS}: {problem}")
    with pytest.raises(UserError, match="line 2"):  # the resume path reads it the same way
        run.truncate_after(1.0)


@pytest.mark.parametrize("row, problem", [
    ('"fid"', "line 2 is not a JSON object"),
    ('{"kimg": 2.0, "fid": null}', "line 2: 'fid' is null, expected a number"),
    ('{"kimg": 2.0}', "line 2: the row has no 'fid'"),
    ('{"kimg": 2.0, "fid": 3.0, "num_images": "6"}', "line 2: 'num_images' is \"6\", expected an integer"),
])
def test_a_fid_row_that_does_not_fit_names_file_and_line(tmp_path, row, problem):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    run.fid_path().write_text('{"kimg": 1.0, "fid": NaN}\n' + row + "\n")  # NaN: a failed evaluation, allowed
    with pytest.raises(UserError) as caught:
        read_fid_rows(run)
    assert str(caught.value).startswith(f"{run.fid_path()}: {problem}")


def test_compare_and_study_status_report_a_bad_row_in_one_line(tmp_path):
    base = make_run(tmp_path, "00001-vanilla", [(10, 20.0), (30, 10.0)])
    other = make_run(tmp_path, "00002-knn", [(10, 14.0), (30, 6.0)], assigner={"name": "knn", "k": 4})
    with open(other / runs.METRICS, "a") as f:
        f.write('{"kimg": "40"}\n')
    result = cli("compare", base, other)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {other / runs.METRICS}: line 5: 'kimg' is \"40\", expected a number; " \
                                    f"fix or remove that line"
    folder = tmp_path / "study"
    spec = study.Study.model_validate({"name": "s", "preset": "quickstart", "baseline": "a",
                                       "runs": {"a": {"set": TINY}, "b": {"set": TINY}}})
    metrics = study.run_dir(folder, "a", 0) / runs.METRICS
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"kimg": 0.016, "img_per_s": "fast"}\n')
    with pytest.raises(UserError, match="line 1: 'img_per_s' is \"fast\", expected a number"):
        study.status(spec, folder)


# --- eval and compare on a run with a cut-off last line ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run whose trainer scored both snapshots (trained once; each test gets a copy)."""
    root = tmp_path_factory.mktemp("trained")

    def stub(mode="clean", device="cpu", weights=None, batch_size=64, **_):  # as conftest's stub_fid
        return FIDExtractor(mode, device, batch_size=batch_size, network=StubNetwork(),
                            info=WeightsInfo("stub", "", "0" * 64, "float32"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMMISCIBLE_CACHE", str(root / "cache"))
        mp.setattr(evaluate, "FIDExtractor", stub)
        mp.setattr(scorer, "FIDExtractor", stub)
        torch.set_num_threads(2)
        return train_with_fid(load_config("quickstart", TINY + FID_SET), out_root=root / "runs").path


@pytest.fixture
def run(trained, tmp_path, stub_fid):
    path = tmp_path / "runs" / trained.name
    shutil.copytree(trained, path)
    return runs.open_run(path)


def test_eval_reads_past_a_cut_off_line_and_writes_nothing(run):
    before = cut_off(run.fid_path(), b'{"kimg": 0.048, "fid": 1')
    result = cli("eval", run.path, "--fid", "--json")
    assert result.exit_code == 0, result.output
    assert [p["kimg"] for p in json.loads(result.stdout)["runs"][0]["curve"]] == [0.016, 0.032]
    assert f"warning: {run.fid_path()}: line 3 is cut off" in result.stderr
    assert run.fid_path().read_bytes() == before and not damaged(run.fid_path()).exists()


def test_eval_that_scores_repairs_the_file_first(run):
    cut_off(run.fid_path(), b'{"kimg": 0.048, "fid": 1')
    result = cli("eval", run.path, "--fid", "--steps", "3", "--ckpt", "latest")
    assert result.exit_code == 0, result.output
    rows = read_fid_rows(run)
    assert [(r["kimg"], r["steps"]) for r in rows] == [(0.016, 2), (0.032, 2), (0.032, 3)]
    assert damaged(run.fid_path()).read_bytes() == b'{"kimg": 0.048, "fid": 1\n'


def test_compare_reads_past_cut_off_lines_and_writes_nothing(tmp_path):
    base = make_run(tmp_path, "00001-vanilla", [(10, 20.0), (30, 10.0)])
    other = make_run(tmp_path, "00002-knn", [(10, 14.0), (30, 6.0)], assigner={"name": "knn", "k": 4})
    before = {p: cut_off(p, b'{"kimg": 50, "lo') for p in (base / runs.METRICS, other / runs.FID)}
    result = cli("compare", base, other, "--json")
    assert result.exit_code == 0, result.output
    assert [r["best_fid"] for r in json.loads(result.stdout)["runs"]] == [10.0, 6.0]
    assert all(f"warning: {p}: line" in result.stderr for p in before)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not any(damaged(p).exists() for p in before)


# --- two evals of one run -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("purpose", ["trained", "evaluated"])
def test_eval_with_points_to_score_is_refused_while_the_run_is_busy(run, purpose):
    before = run.fid_path().read_bytes()
    with run.lock(purpose):
        result = cli("eval", run.path, "--fid", "--steps", "3")
        assert cli("eval", run.path, "--fid").exit_code == 0  # nothing to score: only reads, works beside it
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == f"error: {run.path}: already being {purpose} by pid {os.getpid()}; " \
                                            f"wait for it to finish or stop it first"  # after the reference's bar
    assert run.fid_path().read_bytes() == before


def test_a_second_eval_does_not_write_rows_the_first_wrote_meanwhile(run, monkeypatch):
    assert cli("eval", run.path, "--fid", "--steps", "3").exit_code == 0  # the first eval
    written = read_fid_rows(run)
    assert len(written) == 4
    stale = [r for r in written if r["steps"] == 2]  # what the second read before the first appended
    calls = []

    def racing_read(target):
        calls.append(target)
        return [dict(r) for r in stale] if len(calls) == 1 else read_fid_rows(target)

    def never(*args, **kwargs):
        raise AssertionError("scored a checkpoint that already had a row")

    monkeypatch.setattr(evaluate, "read_fid_rows", racing_read)
    monkeypatch.setattr(evaluate.FIDScorer, "score", never)
    result = cli("eval", run.path, "--fid", "--steps", "3", "--json")
    assert result.exit_code == 0, result.output
    assert "0 to score" in result.stderr and len(calls) == 2
    assert read_fid_rows(run) == written
    assert len(json.loads(result.stdout)["runs"][0]["curve"]) == 2  # no duplicates in the curve either


def test_a_lock_written_by_an_older_trainer_still_names_its_pid(tmp_path):
    run = run_create.create_run(tmp_path, load_config("quickstart"))
    fd = os.open(run.lock_path(), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242")  # the pid alone, as before eval took the lock
        with pytest.raises(runs.RunError, match="already being trained by pid 4242;"):
            with run.lock("evaluated"):
                pass
    finally:
        os.close(fd)


# --- --run-dir into a folder that is not a run ---------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("dry_run", [False, True])
def test_train_into_a_foreign_folder_is_refused_untouched(tmp_path, tiny, dry_run):
    folder = tmp_path / "photos"
    (folder / "2019").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "2019" / "a.jpg").write_bytes(b"\xff\xd8")
    (folder / "checkpoints").mkdir()  # a name of ours beside them does not make it a run
    before = snapshot(folder)
    result = cli("train", "--run-dir", folder, *(["--dry-run"] if dry_run else []),
                 *sum((["--set", s] for s in tiny), []))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {folder}: not empty and not a run of ours (it holds 2019, " \
                                    f"notes.txt); choose a new or empty folder for --run-dir"
    assert snapshot(folder) == before


def test_which_folders_can_become_a_run(tmp_path):
    run_create.check_new_run_dir(tmp_path / "new" / "deeper")  # not there yet
    (tmp_path / "empty").mkdir()
    run_create.check_new_run_dir(tmp_path / "empty")
    half = tmp_path / "half"  # a create that crashed before config.yaml
    for name in ("checkpoints", "samples"):
        (half / name).mkdir(parents=True)
    (half / "meta.json").write_text('{"argv": [], "immiscible_version": "0"}')  # ours: another tool's is refused
    (half / ".config.yaml.tmp-123").write_text("")
    run_create.check_new_run_dir(half)
    (tmp_path / "file").write_text("x")
    with pytest.raises(runs.RunError, match="is a file, not a folder"):
        run_create.check_new_run_dir(tmp_path / "file")
    made = run_create.create_run_at(tmp_path / "made", load_config("quickstart"))
    with pytest.raises(runs.RunError, match="already holds a run"):
        run_create.check_new_run_dir(made.path)
