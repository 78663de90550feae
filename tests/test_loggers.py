"""train.loggers: TensorBoard event files and W&B offline runs hold what metrics.jsonl / fid.jsonl / samples/ hold,
continue on resume without duplicated steps, and a missing extra is refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import pytest
from typer.testing import CliRunner

from conftest import train_with_fid

from immiscible_cli import loggers, runs, trainer
from immiscible_cli.cli import app
from immiscible_cli.config import load_config
from immiscible_cli.runs import read_fid_rows

# 8-image ticks, a snapshot and a 4-image stub FID point every 16 images, 32 images in all.
FID = ["eval.every_kimg=0.016", "eval.num_images=4", "eval.steps=2", "eval.reference_images=10",
       "eval.batch_size=4"]


def only_run(root) -> runs.Run:
    (path,) = [p for p in root.iterdir() if p.is_dir()]
    return runs.open_run(path)


def tensorboard_events(run: runs.Run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path / loggers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    events.Reload()  # purges the events a resumed writer's purge_step hides, as TensorBoard shows them
    return events


def assert_same_as_jsonl(run: runs.Run, events) -> None:
    """Every numeric field of every metrics.jsonl row at its images-seen step, the FID curve, the grids: once."""
    rows = run.metrics()
    fields = sorted({key for row in rows for key in loggers.numeric_fields(row)})
    assert {"loss", "lr", "img_per_s", "kimg", "train_s"} <= set(fields)
    assert sorted(tag for tag in events.Tags()["scalars"] if tag.startswith("train/")) == [f"train/{k}"
                                                                                          for k in fields]
    for key in fields:
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        expected = [(round(row["kimg"] * 1000), float(row[key])) for row in rows if key in row]
        assert [step for step, _ in logged] == [step for step, _ in expected], key  # each step once, in order
        assert [value for _, value in logged] == pytest.approx([v for _, v in expected], rel=1e-6), key
    curve = read_fid_rows(run)
    assert [(e.step, e.value) for e in events.Scalars("fid/fid")] == \
        [(round(r["kimg"] * 1000), pytest.approx(r["fid"], rel=1e-6)) for r in curve]
    grids = sorted(p.name for p in (run.path / "samples").iterdir())
    assert [e.step for e in events.Images("samples/grid")] == [16, 32] and len(grids) == 2


def test_tensorboard_holds_the_jsonl_rows_and_resume_continues_it_without_duplicates(tmp_path, tiny, stub_fid):
    pytest.importorskip("tensorboard")
    cfg = load_config("quickstart", tiny + FID + ["train.tick_kimg=0.008", "train.loggers=[tensorboard]"])
    run = train_with_fid(cfg, out_root=tmp_path / "runs")
    assert (run.path / "metrics.jsonl").is_file() and (run.path / "fid.jsonl").is_file()  # jsonl always written
    assert [r["step"] for r in run.metrics()] == [1, 2, 3, 4]
    first = tensorboard_events(run)
    assert_same_as_jsonl(run, first)
    before = {tag: [(e.step, e.value) for e in first.Scalars(tag)] for tag in first.Tags()["scalars"]}

    # A crash after the last snapshot was written but lost: the run resumes at 16 images and replays 24 and 32.
    (run.path / "checkpoints" / "snapshot-000000.032kimg.pt").unlink()
    resumed = train_with_fid(cfg, out_root=tmp_path / "runs", run_dir=run.path)
    assert "resumed from snapshot-000000.016kimg.pt" in run.log_path().read_text()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]  # the same run directory ...
    assert [p.name for p in (resumed.path / loggers.TENSORBOARD_DIR).iterdir() if p.is_dir()] == []
    assert len(list((resumed.path / loggers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2  # ... same log dir
    after = tensorboard_events(resumed)
    assert_same_as_jsonl(resumed, after)  # no step twice, values those of the rows kept after the resume
    for tag in ("train/loss", "train/lr", "train/pair_dist", "train/noise_sqnorm", "fid/fid"):  # not timings
        assert [(e.step, e.value) for e in after.Scalars(tag)] == before[tag], tag  # an exact CPU resume


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_extra_is_refused_before_anything_is_written(tmp_path, tiny, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # `import tensorboard` / `import wandb` now fails
    sets = sum((["--set", s] for s in tiny + [f"train.loggers=[jsonl, {backend}]"]), [])
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "runs"), *sets])
    assert result.exit_code == 2, result.output
    assert f"pip install 'immiscible[{backend}]'" in result.output and "train.loggers" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    with pytest.raises(loggers.LoggerMissing, match=backend):  # the library refuses it before any write too
        trainer.train(load_config("quickstart", tiny + [f"train.loggers=[{backend}]"]), out_root=tmp_path / "lib")
    assert not (tmp_path / "lib").exists()


def test_numeric_fields_are_the_row_scalars_without_axes():
    row = {"kimg": 0.016, "step": 2, "loss": 1.5, "pair_dist_reduction": None, "world_size": 1, "time": 1e9,
           "flag": True, "name": "x"}
    assert loggers.numeric_fields(row) == {"kimg": 0.016, "loss": 1.5, "world_size": 1.0}
    assert loggers.images_seen(0.016) == 16 and loggers.images_seen(51200.256) == 51_200_256


def wandb_records(path) -> list[dict]:
    """The history rows of an offline W&B run file (a LevelDB-style log of protobuf `Record`s after a 7-byte
    header, in 32 KiB blocks, each piece with a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, pending, rows = path.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_runs_offline_inside_the_run_and_resumes_the_same_run(tmp_path, tiny, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("quickstart", tiny + ["train.loggers=[wandb]"])
    run = trainer.train(cfg, out_root=tmp_path / "runs")
    run_id = (run.path / loggers.WANDB_ID).read_text().strip()
    (offline,) = (run.path / "wandb").glob(f"offline-run-*-{run_id}")
    history = wandb_records(next(offline.glob("run-*.wandb")))
    ticks = [(r["images"], r["train/loss"]) for r in history if "train/loss" in r]
    assert ticks == [(round(m["kimg"] * 1000), pytest.approx(m["loss"], rel=1e-6)) for m in run.metrics()]
    grids = [r for r in history if r.get("samples/grid/_type") == "image-file"]  # W&B copies the PNG as it is
    assert [r["images"] for r in grids] == [16, 32]
    assert [r["samples/grid/sha256"] for r in grids] == [hashlib.sha256(run.grid_path(kimg).read_bytes()).hexdigest()
                                                         for kimg in (0.016, 0.032)]
    assert all((offline / "files" / r["samples/grid/path"]).is_file() for r in grids)
    logger = loggers.open_loggers(cfg, run, resumed_at=32)  # what a resume opens: the same W&B run id
    logger.close()
    assert (run.path / loggers.WANDB_ID).read_text().strip() == run_id
    offline_runs = list((run.path / "wandb").glob("offline-run-*"))
    assert offline_runs and all(p.name.endswith(f"-{run_id}") for p in offline_runs)
