"""`immiscible compare`: target crossing and speed-up (exact, on tiny synthetic runs), the FID points bracketing each
crossing, seed groups, FID-settings checks, the JSON / CSV / table outputs, the PNG plot, and the user errors (exit 2,
one line, no traceback). Per-seed speed-ups are in test_compare_seeds.py; the fake runs in compare_fakes.py."""

from __future__ import annotations

import csv
import io
import json
import math
import struct
from pathlib import Path

import pytest
import yaml
from compare_fakes import SETTINGS, as_json, invoke, make_run
from rich.console import Console

from immiscible_cli import compare
from immiscible_cli.compare import (CompareError, Curve, crossing, kimg_to_reach, mean_curve, shared_kimg_points,
                                    speedup, value_at)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Baseline reaches FID 10 at kimg 40 (between (30, 12) and (50, 8)); the other at kimg 20 (between (10, 14)
    and (30, 6)), so the speed-up at target 10 is exactly 2. Seconds per kimg: 10 (baseline) and 16 (knn)."""
    base = make_run(tmp_path, "00001-vanilla", [(50, 8.0), (10, 20.0), (30, 12.0), (70, 7.0)])  # out of order
    knn = make_run(tmp_path, "00002-knn", [(10, 14.0), (30, 6.0), (50, 5.0), (70, 4.5)], assigner={"name": "knn", "k": 8},
                   seconds_per_kimg=16.0)
    return base, knn


# --- the pure core ---------------------------------------------------------------------------------------------------


def test_kimg_to_reach_interpolates_at_the_first_crossing_and_never_extrapolates() -> None:
    curve = [(10, 20.0), (30, 12.0), (50, 8.0), (70, 11.0), (90, 7.0)]
    assert kimg_to_reach(curve, 10.0) == 40.0  # between (30, 12) and (50, 8); the later dip is not used
    assert kimg_to_reach(curve, 12.0) == 30.0  # exactly on a point
    assert kimg_to_reach(curve, 6.0) is None  # not reached
    assert kimg_to_reach(curve, 25.0) == 10.0  # first point already below: its kimg, not a guess towards 0
    assert kimg_to_reach([], 5.0) is None


def test_crossing_reports_the_fid_points_either_side() -> None:
    curve = [(10, 20.0), (30, 12.0), (50, 8.0)]
    found = crossing(curve, 10.0)
    assert (found.kimg, found.before, found.after) == (40.0, (30, 12.0), (50, 8.0))
    assert found.bracket() == {"before": {"kimg": 30, "fid": 12.0}, "after": {"kimg": 50, "fid": 8.0}}
    on_point = crossing(curve, 12.0)  # exactly on a point: that point is the one after, the previous one before it
    assert (on_point.kimg, on_point.before, on_point.after) == (30.0, (10, 20.0), (30, 12.0))
    first = crossing(curve, 25.0)  # nothing was measured before the first point
    assert first.at_first_point and first.bracket() == {"before": None, "after": {"kimg": 10, "fid": 20.0}}
    assert crossing(curve, 7.0) is None


def test_value_at_speedup_and_shared_points() -> None:
    points = [(10, 1.0), (30, 3.0)]
    assert value_at(points, 10) == (1.0, False)
    assert value_at(points, 20) == (2.0, True)
    assert value_at(points, 5) is None and value_at(points, 31) is None
    assert speedup(40.0, 20.0) == 2.0
    assert speedup(None, 20.0) is None and speedup(40.0, None) is None
    assert shared_kimg_points([[10, 20, 30, 40], [0, 20, 40, 60]]) == [10, 20, 30, 40]
    assert shared_kimg_points([[float(k) for k in range(0, 101, 10)]], limit=3) == [0, 50, 100]


def test_mean_curve_over_seeds() -> None:
    seeds = [Curve([10, 30], [14.0, 6.0], [100.0, 300.0]), Curve([10, 30, 50], [16.0, 8.0, 7.0], [120.0, 320.0, 500])]
    mean = mean_curve(seeds)
    assert mean.kimg == [10, 30]  # only the range both seeds cover
    assert mean.fid == [15.0, 7.0] and mean.train_s == [110.0, 310.0]
    assert mean.fid_std == pytest.approx([math.sqrt(2)] * 2)
    assert mean_curve([Curve([10], [1.0], [None]), Curve([20], [1.0], [None])]) is None


def test_curve_from_rows_sorts_keeps_the_latest_rescore_and_reads_seconds_from_ticks() -> None:
    rows = [{"kimg": 30, "fid": 9.0, "train_s": 300.0}, {"kimg": 10, "fid": 20.0}, {"kimg": 30, "fid": 8.0}]
    ticks = [{"kimg": 0, "train_s": 0.0}, {"kimg": 20, "train_s": 250.0}, {"kimg": 40, "train_s": 450.0}]
    curve = compare.curve_from_rows(rows, ticks)
    assert curve.kimg == [10, 30] and curve.fid == [20.0, 8.0]
    assert curve.train_s == [125.0, 350.0]  # interpolated between ticks where the FID row has no train_s


# --- speed-up through the CLI ----------------------------------------------------------------------------------------


def test_speedup_exact_at_a_given_target(pair: tuple[Path, Path]) -> None:
    base, knn = pair
    document = as_json(base, knn, "--target", "10")
    assert document["baseline"] == "00001-vanilla" and document["target"] == 10.0
    first, second = document["runs"]
    assert first["kimg_to_target"] == 40.0 and first["speedup"] == 1.0
    assert second["kimg_to_target"] == 20.0 and second["speedup"] == 2.0
    # wall clock: 40 kimg * 10 s = 400 s against 20 kimg * 16 s = 320 s
    assert second["seconds_to_target"] == 320.0 and second["speedup_wallclock"] == 1.25


def test_default_target_is_the_baseline_best_and_not_reached_is_null(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, knn = pair
    slow = make_run(tmp_path, "00003-slow", [(10, 30.0), (70, 9.0)], batch_size=64)
    document = as_json(base, knn, slow)
    assert document["target"] == 7.0 and document["target_source"] == "baseline best FID"
    rows = {r["run"]: r for r in document["runs"]}
    assert rows["00001-vanilla"]["best_fid"] == 7.0 and rows["00001-vanilla"]["best_kimg"] == 70
    assert rows["00001-vanilla"]["kimg_to_target"] == 70.0
    assert rows["00002-knn"]["kimg_to_target"] == 27.5  # 10 + (14 - 7) / (14 - 6) * 20
    assert rows["00002-knn"]["speedup"] == pytest.approx(70 / 27.5)
    assert rows["00003-slow"]["kimg_to_target"] is None and rows["00003-slow"]["speedup"] is None
    assert not any(r["target_at_first_point"] for r in rows.values())
    early = as_json(base, knn, "--target", "15")  # knn's first point (10, 14) already meets it: kimg 10, flagged
    assert early["runs"][1]["kimg_to_target"] == 10.0 and early["runs"][1]["target_at_first_point"] is True
    assert "10†" in invoke(base, knn, "--target", "15").stdout
    table = invoke(base, knn, slow)
    assert table.exit_code == 0 and "not reached" in table.stdout
    unreachable = invoke(base, knn, "--target", "1", "--json")
    assert "never reaches FID 1.00" in unreachable.stderr
    assert all(r["speedup"] is None for r in json.loads(unreachable.stdout)["runs"])


def test_brackets_of_each_crossing_in_json_table_and_csv(pair: tuple[Path, Path]) -> None:
    base, knn = pair
    first, second = as_json(base, knn, "--target", "10")["runs"]
    assert first["target_bracket"] == {"before": {"kimg": 30.0, "fid": 12.0}, "after": {"kimg": 50.0, "fid": 8.0}}
    assert second["target_bracket"] == {"before": {"kimg": 10.0, "fid": 14.0}, "after": {"kimg": 30.0, "fid": 6.0}}
    assert as_json(base, knn, "--target", "5.5")["runs"][0]["target_bracket"] is None  # not reached: no bracket
    table = invoke(base, knn, "--target", "10").stdout
    assert "40 (between 30: 12.00 and 50: 8.00)" in table and "20 (between 10: 14.00 and 30: 6.00)" in table
    assert "10† (first point: 14.00)" in invoke(base, knn, "--target", "15").stdout
    rows = list(csv.DictReader(io.StringIO(invoke(base, knn, "--csv", "--target", "10").stdout)))
    assert [rows[1][f"target_{k}"] for k in ("before_kimg", "before_fid", "after_kimg", "after_fid")] == \
        ["10.0", "14.0", "30.0", "6.0"]
    assert rows[1]["baseline_before_kimg"] == "30.0" and rows[1]["baseline_after_fid"] == "8.0"


def test_baseline_option_picks_the_reference_and_is_added_when_missing(pair: tuple[Path, Path]) -> None:
    base, knn = pair
    document = as_json(base, knn, "--baseline", knn, "--target", "10")
    assert document["baseline"] == "00002-knn"
    assert {r["run"]: r["speedup"] for r in document["runs"]} == {"00001-vanilla": 0.5, "00002-knn": 1.0}
    added = as_json(knn, "--baseline", base, "--target", "10")  # a baseline outside RUNS joins the comparison
    assert [r["run"] for r in added["runs"]] == ["00001-vanilla", "00002-knn"]


def test_seed_group_mean_std_and_speedup_from_the_mean_curve(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, knn = pair
    knn_seed1 = make_run(tmp_path, "00003-knn", [(10, 16.0), (30, 8.0), (50, 7.0), (70, 6.5)],
                         assigner={"name": "knn", "k": 8}, seed=1, seconds_per_kimg=16.0)
    document = as_json(base, knn, knn_seed1, "--target", "10")
    assert len(document["runs"]) == 2
    group = document["runs"][1]
    assert group["n_seeds"] == 2 and group["members"] == ["00002-knn", "00003-knn"]
    assert group["best_fid"] == 5.5 and group["best_fid_std"] == pytest.approx(math.sqrt(2))
    # mean curve (10, 15), (30, 7): FID 10 at 10 + 5/8 * 20 = 22.5 kimg
    assert group["kimg_to_target"] == pytest.approx(22.5) and group["speedup"] == pytest.approx(40 / 22.5)
    table = invoke(base, knn, knn_seed1, "--target", "10")
    assert table.exit_code == 0 and "±" in table.stdout and "mean ± std over seeds" in table.stdout


def test_a_run_made_before_a_field_existed_is_a_seed_of_the_same_experiment(pair: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    """A config.yaml written by an older version lacks later fields; they read as their defaults (the behaviour the
    run had), so it still groups with newer seeds. A real difference (the learning rate) still separates runs."""
    base, knn = pair
    older = yaml.safe_load((knn / "config.yaml").read_text())
    del older["sample"]["start_std"], older["train"]["loggers"], older["train"]["channels_last"]
    (knn / "config.yaml").write_text(yaml.safe_dump(older))
    seed1 = make_run(tmp_path, "00003-knn", [(10, 16.0), (30, 8.0)], assigner={"name": "knn", "k": 8}, seed=1)
    grouped = as_json(base, knn, seed1, "--target", "10")
    assert [r["n_seeds"] for r in grouped["runs"]] == [1, 2]
    other = yaml.safe_load((seed1 / "config.yaml").read_text())
    other["train"]["lr"] = 1e-3
    (seed1 / "config.yaml").write_text(yaml.safe_dump(other))
    assert [r["n_seeds"] for r in as_json(base, knn, seed1, "--target", "10")["runs"]] == [1, 1, 1]


# --- FID settings --------------------------------------------------------------------------------------------------


def test_a_shared_settings_combination_is_used_and_others_ignored(tmp_path: Path) -> None:
    final_50k = {"kimg": 70, "step": 0, "fid": 1.0, **SETTINGS, "num_images": 50000, "train_s": 700.0}
    base = make_run(tmp_path, "00001-vanilla", [(10, 20.0), (70, 7.0)], extra_rows=[final_50k])
    other = make_run(tmp_path, "00002-knn", [(10, 14.0), (70, 5.0)], assigner={"name": "knn", "k": 4})
    result = invoke(base, other, "--json")
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert json.loads(result.stdout)["runs"][0]["best_fid"] == 7.0  # the 50k row is another curve


OWN = {**SETTINGS, "sampling": {"eta": 0.0}}  # rows written before `start_std` was recorded: it was 1


def _rescored(points: list[tuple[float, float]], start_std: float) -> list[dict]:
    """fid.jsonl rows of an `eval --set sample.start_std=S` rescoring of the same checkpoints."""
    sampling = {"eta": 0.0, "start_std": start_std}
    return [{"kimg": k, "step": 0, "fid": fid, **SETTINGS, "sampling": sampling, "seconds": 1.0, "train_s": k * 10.0,
             "time": "t"} for k, fid in points]


def test_where_compares_the_curves_scored_with_a_setting(tmp_path: Path) -> None:
    # the runs' own curves: knn never reaches vanilla's best (7); rescored with a smaller start, it gets there first
    base = make_run(tmp_path, "00001-vanilla", [(10, 20.0), (30, 12.0), (50, 7.0)], settings=OWN,
                    extra_rows=_rescored([(10, 18.0), (30, 10.0), (50, 6.0)], 0.98))
    knn = make_run(tmp_path, "00002-knn", [(10, 30.0), (30, 25.0), (50, 20.0)], assigner={"name": "knn", "k": 8},
                   settings=OWN, extra_rows=_rescored([(10, 12.0), (30, 6.0), (50, 5.0)], 0.98) + _rescored(
                       [(50, 9.0)], 0.95))
    plain = as_json(base, knn)  # as many rescored points as own ones: the runs' own curves (written first) win
    assert plain["target"] == 7.0 and plain["runs"][1]["speedup"] is None and "where" not in plain
    cooler = as_json(base, knn, "--where", "sampling.start_std=0.98")
    assert cooler["target"] == 6.0 and cooler["where"] == ["sampling.start_std=0.98"]
    # knn reaches 6 at kimg 30, vanilla at 50: 50 / 30
    assert cooler["runs"][1]["speedup"] == pytest.approx(50 / 30)
    assert as_json(base, knn, "--where", "sampling.start_std=1")["runs"][1]["speedup"] is None  # an old row's default
    table = invoke(base, knn, "--where", "sampling.start_std=0.98", "--where", "num_images=10000")
    assert table.exit_code == 0 and "only the FID points scored with sampling.start_std=0.98, num_images=10000" in (
        table.stdout.replace("\n", " "))
    for args, message in {("--where", "start_std=0.98"): "FIELD one of the FID settings",
                          ("--where", "sampling.start_std"): "expected FIELD=VALUE",
                          ("--where", "sampling.start_std=0.95"): "run 00001-vanilla has no FID point with"}.items():
        result = invoke(base, knn, *args)
        assert result.exit_code == 2 and message in result.stderr and result.stdout == "", (args, result.output)


def test_settings_mismatch_warns_and_strict_refuses(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = pair
    other = make_run(tmp_path, "00003-heun", [(10, 14.0), (30, 6.0)], assigner={"name": "knn", "k": 4},
                     settings={**SETTINGS, "sampler": "heun"})
    warned = invoke(base, other, "--json")
    assert warned.exit_code == 0
    assert "sampler" in warned.stderr and "00001-vanilla: euler" in warned.stderr and "00003-heun" in warned.stderr
    json.loads(warned.stdout)  # the warning stays off stdout
    refused = invoke(base, other, "--strict")
    assert refused.exit_code == 2 and "sampler" in refused.stderr and "error:" in refused.stderr


# --- output formats ------------------------------------------------------------------------------------------------


def test_json_schema(pair: tuple[Path, Path]) -> None:
    document = as_json(*pair)
    assert set(document) >= {"baseline", "target", "runs"} and isinstance(document["target"], float)
    types = {"run": str, "assigner": str, "best_fid": float, "best_kimg": (int, float), "final_fid": float,
             "kimg_to_target": (float, type(None)), "speedup": (float, type(None)),
             "speedup_wallclock": (float, type(None)), "objective": str, "batch_size": int, "n_seeds": int}
    for row in document["runs"]:
        for key, kind in types.items():
            assert isinstance(row[key], kind), (key, row[key])
    assert [r["assigner"] for r in document["runs"]] == ["vanilla", "knn k=8"]
    assert all(r["seeds"] is None for r in document["runs"])  # single runs: no per-seed block
    assert [r["member_seeds"] for r in document["runs"]] == [[0], [0]]


def test_csv_has_a_header_and_one_row_per_run(pair: tuple[Path, Path]) -> None:
    result = invoke(*pair, "--csv", "--target", "10")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["run"] for r in rows] == ["00001-vanilla", "00002-knn"]
    assert float(rows[1]["speedup"]) == 2.0 and rows[0]["best_fid_std"] == ""
    assert [r["kind"] for r in rows] == ["group", "group"] and rows[1]["seed_median_speedup"] == ""


def test_table_marks_interpolated_values_and_labels_assigners(tmp_path: Path) -> None:
    base = make_run(tmp_path, "00001-vanilla", [(10, 20.0), (30, 12.0), (50, 8.0)])
    other = make_run(tmp_path, "00002-linear", [(10, 14.0), (40, 6.0), (50, 5.0)],
                     assigner={"name": "linear", "quantize": "fp16", "image_scale": 2.0})
    result = invoke(base, other)
    assert result.exit_code == 0
    assert "linear l2 fp16 x2" in result.stdout and "*" in result.stdout and "interpolated" in result.stdout


def test_plot_is_a_png_of_sensible_size(pair: tuple[Path, Path], tmp_path: Path) -> None:
    target = tmp_path / "curves.png"
    result = invoke(*pair, "--plot", target)
    assert result.exit_code == 0 and str(target) in result.stdout
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 4000 and 300 <= height <= 3000
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # written atomically, nothing left behind


# --- errors ----------------------------------------------------------------------------------------------------------


def test_user_errors_exit_2_with_one_line(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, knn = pair
    empty = make_run(tmp_path, "00009-empty", [(10, 20.0)])
    (empty / "fid.jsonl").write_text("")
    seed1 = make_run(tmp_path, "00010-vanilla", [(10, 20.0), (30, 9.0)], seed=1)
    cases = {
        (str(base),): "at least two runs",
        (str(base), str(tmp_path / "nowhere")): "no such run directory",
        (str(base), str(tmp_path)): "not a run directory",
        (str(base), str(empty)): f"immiscible eval {empty} --fid",
        (str(base), str(knn), "--target", "-1"): "positive",
        (str(base), str(seed1)): "differ only in their seed",
        (str(base), str(knn), "--plot", str(tmp_path / "missing" / "a.png")): "--plot",
    }
    for args, message in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and result.stderr.count("error:") == 1, (args, result.stderr)
        assert result.stdout == ""


def test_library_entry_raises_compare_error(pair: tuple[Path, Path]) -> None:
    console = Console(file=io.StringIO())
    with pytest.raises(CompareError, match="positive"):
        compare.main(list(pair), target=0.0, baseline=None, plot=None, fmt="table", strict=False, out=console,
                     err=console)


TORCH_FREE = """
import json, sys
from typer.testing import CliRunner
from immiscible_cli.cli import app
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
assert not loaded, loaded[:5]
print("ok")
"""


def test_compare_and_presets_import_no_torch(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    base, knn = pair
    commands = [["compare", str(base), str(knn), "--json"], ["compare", str(base), str(knn), "--plot",
                                                               str(tmp_path / "curves.png")],
                ["presets"], ["presets", "show", "cifar10-knn"]]
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, json.dumps(commands)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
