"""`immiscible compare` seed by seed: runs of the baseline group and of another group sharing a seed are paired, each
pair has its own speed-up at the baseline seed's best FID (or --target), and a group reports their median, min-max
spread and a reproducible percentile bootstrap interval; "not reached" stays "not reached". Exact on tiny fake runs
(compare_fakes.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from compare_fakes import as_json, invoke, make_run

from immiscible_cli.compare_curves import Curve
from immiscible_cli.compare_runs import Member
from immiscible_cli.compare_seeds import bootstrap_interval, pair_by_seed, ranked_median

KNN = {"name": "knn", "k": 8}
VANILLA = {0: [(10, 20.0), (30, 12.0), (50, 8.0)],  # best FIDs 8, 10 and 6, each reached at kimg 50
           1: [(10, 22.0), (30, 14.0), (50, 10.0)],
           2: [(10, 18.0), (30, 11.0), (50, 6.0)]}
# At its baseline seed's best FID: seed 0 reaches 8 at kimg 30, seed 1 reaches 10 at 10 + 4/5 * 20 = 26, seed 2
# reaches 6 at 30 + 4/5 * 20 = 46: speed-ups 50/30, 50/26, 50/46, median 50/30.
KNN_CURVES = {0: [(10, 16.0), (30, 8.0), (50, 6.0)],
              1: [(10, 14.0), (30, 9.0), (50, 7.0)],
              2: [(10, 15.0), (30, 10.0), (50, 5.0)]}
NEVER_6 = [(10, 15.0), (30, 10.0), (50, 7.0)]  # seed 2 stopping short of FID 6


def seed_runs(root: Path, seeds: tuple[int, ...] = (0, 1, 2), knn: dict | None = None) -> list[Path]:
    """Vanilla seeds in order, then knn seeds in reverse order, so pairing by position would pair the wrong runs."""
    knn = {**KNN_CURVES, **(knn or {})}
    runs = [make_run(root, f"0000{i + 1}-vanilla", VANILLA[s], seed=s) for i, s in enumerate(seeds)]
    return runs + [make_run(root, f"0001{i}-knn", knn[s], seed=s, assigner=KNN) for i, s in enumerate(reversed(seeds))]


def seed_block(*args: object) -> dict:
    """The knn group's per-seed block of the JSON document (the baseline's own is None)."""
    base, group = as_json(*args)["runs"]
    assert base["seeds"] is None
    return group["seeds"]


def by_seed(block: dict) -> dict[int, dict]:
    return {p["seed"]: p for p in block["pairs"]}


def members(*seeds: int, prefix: str = "r") -> list[Member]:
    return [Member(f"{prefix}{i}", s, Curve([10.0], [1.0], [None])) for i, s in enumerate(seeds)]


# --- the pure statistics -------------------------------------------------------------------------------------------


def test_pair_by_seed_matches_seeds_not_positions_and_names_the_rest() -> None:
    base, runs = members(0, 1, 2, prefix="b"), members(2, 0, 5)
    pairs, unpaired = pair_by_seed(base, runs)
    assert [(b.name, r.name) for b, r in pairs] == [("b2", "r0"), ("b0", "r1")]
    assert [m.name for m in unpaired] == ["b1", "r2"]
    twice, rest = pair_by_seed(members(0, 0, 1, prefix="b"), members(0, 1))  # seed 0 twice: with which would it pair?
    assert [(b.name, r.name) for b, r in twice] == [("b2", "r1")] and [m.name for m in rest] == ["b0", "b1", "r0"]


def test_ranked_median_counts_not_reached_as_the_lowest() -> None:
    assert ranked_median([2.0, 1.0, 3.0]) == 2.0
    assert ranked_median([2.0, None, 3.0]) == 2.0  # one not reached of three: the median is still reached
    assert ranked_median([None, 3.0, None]) is None  # two of three: not reached
    assert ranked_median([1.0, 2.0, None, 4.0]) == 1.5
    assert ranked_median([None, 2.0]) is None  # half of the pairs: not reached


def test_bootstrap_interval_is_reproducible_contains_the_median_and_depends_on_its_seed() -> None:
    values = [1.1, 1.3, 1.4, 1.6, 1.9, 2.2, 2.8, 3.1]
    low, high = bootstrap_interval(values)
    assert min(values) <= low < ranked_median(values) == 1.75 < high <= max(values)
    assert (low, high) == pytest.approx((1.35, 2.5))  # 2000 resamples with RNG seed 0: the same numbers every time
    # with few resamples the draw shows: each RNG seed repeats its own interval, and the seeds do not all agree
    draws = [bootstrap_interval(values, resamples=40, rng_seed=seed) for seed in range(6)]
    assert draws == [bootstrap_interval(values, resamples=40, rng_seed=seed) for seed in range(6)]
    assert len(set(draws)) > 1
    assert bootstrap_interval([None, None, 2.0, 3.0, 4.0])[0] is None  # a bound can be "not reached"


# --- through the command -------------------------------------------------------------------------------------------


def test_per_seed_speedups_pair_by_seed_with_median_and_spread(tmp_path: Path) -> None:
    block = seed_block(*seed_runs(tmp_path))
    pairs = by_seed(block)
    assert {s: (p["baseline_run"], p["run"]) for s, p in pairs.items()} == {
        0: ("00001-vanilla", "00012-knn"), 1: ("00002-vanilla", "00011-knn"), 2: ("00003-vanilla", "00010-knn")}
    assert {s: p["target"] for s, p in pairs.items()} == {0: 8.0, 1: 10.0, 2: 6.0}  # each baseline seed's best
    assert {s: p["kimg_to_target"] for s, p in pairs.items()} == pytest.approx({0: 30.0, 1: 26.0, 2: 46.0})
    assert {s: p["speedup"] for s, p in pairs.items()} == pytest.approx({0: 50 / 30, 1: 50 / 26, 2: 50 / 46})
    assert block["median"] == pytest.approx(50 / 30) and block["median_not_reached"] is False
    assert (block["min"], block["max"]) == pytest.approx((50 / 46, 50 / 26))
    assert (block["n_pairs"], block["n_reached"], block["n_not_reached"]) == (3, 3, 0)
    assert block["target_source"] == "each baseline seed's best FID" and block["unpaired"] == []


def test_each_pair_reports_the_points_bracketing_both_crossings(tmp_path: Path) -> None:
    pair = by_seed(seed_block(*seed_runs(tmp_path)))[1]
    assert pair["bracket"] == {"before": {"kimg": 10.0, "fid": 14.0}, "after": {"kimg": 30.0, "fid": 9.0}}
    assert pair["baseline_bracket"] == {"before": {"kimg": 30.0, "fid": 14.0}, "after": {"kimg": 50.0, "fid": 10.0}}
    assert pair["baseline_kimg_to_target"] == 50.0 and pair["target_at_first_point"] is False


def test_bootstrap_interval_in_the_document_is_reproducible_and_contains_the_median(tmp_path: Path) -> None:
    runs = seed_runs(tmp_path)
    block = seed_block(*runs)
    interval = block["interval"]
    assert interval["low"] <= block["median"] <= interval["high"]
    assert (interval["level"], interval["resamples"], interval["rng_seed"]) == (0.9, 2000, 0)
    assert seed_block(*runs)["interval"] == interval and block["interval_unavailable"] is None


def test_a_seed_that_never_reaches_the_target_stays_not_reached(tmp_path: Path) -> None:
    runs = seed_runs(tmp_path, knn={2: NEVER_6})
    block = seed_block(*runs)
    stuck = by_seed(block)[2]
    assert stuck["status"] == "not reached" and stuck["speedup"] is None and stuck["bracket"] is None
    assert (block["n_pairs"], block["n_reached"], block["n_not_reached"]) == (3, 2, 1)  # counted, not dropped
    assert block["median"] == pytest.approx(50 / 30)  # ranked lowest: the middle of the three is still 50/30
    assert block["min"] is None and block["max"] == pytest.approx(50 / 26)  # the spread starts at "not reached"
    assert block["interval"] is None and "2 reached" in block["interval_unavailable"]  # only 2 reached pairs
    table = invoke(*runs).stdout
    assert "not reached – 1.92x" in table and "n/a (2 reached)" in table
    assert "ranked below every speed-up" in table


def test_fewer_than_three_seeds_give_no_interval(tmp_path: Path) -> None:
    runs = seed_runs(tmp_path, seeds=(0, 1))
    block = seed_block(*runs)
    assert block["n_pairs"] == 2 and block["median"] == pytest.approx((50 / 30 + 50 / 26) / 2)
    assert block["interval"] is None and "needs at least 3" in block["interval_unavailable"]
    assert "n/a (2 reached)" in invoke(*runs).stdout


def test_a_given_target_applies_to_every_pair_and_a_baseline_seed_short_of_it_is_counted_apart(
        tmp_path: Path) -> None:
    block = seed_block(*seed_runs(tmp_path), "--target", "7")
    pairs = by_seed(block)
    assert {p["target"] for p in pairs.values()} == {7.0} and block["target_source"] == "--target"
    assert [pairs[s]["status"] for s in (0, 1, 2)] == ["baseline not reached", "baseline not reached", "reached"]
    assert pairs[2]["speedup"] == pytest.approx(46 / 42)  # 30 + 4/5 * 20 = 46 against 30 + 3/5 * 20 = 42
    assert (block["n_baseline_not_reached"], block["n_reached"], block["n_not_reached"]) == (2, 1, 0)
    assert block["median"] == pytest.approx(46 / 42)


def test_runs_without_a_same_seed_partner_are_named(tmp_path: Path) -> None:
    runs = seed_runs(tmp_path)
    lone = make_run(tmp_path, "00020-knn", KNN_CURVES[0], seed=7, assigner=KNN)
    result = invoke(*runs, lone, "--json")
    assert result.exit_code == 0 and "00020-knn (seed 7)" in result.stderr and "warning" in result.stderr
    block = json.loads(result.stdout)["runs"][1]["seeds"]
    assert block["unpaired"] == [{"run": "00020-knn", "seed": 7}] and block["n_pairs"] == 3


def test_table_and_csv_show_every_pair_and_the_summary(tmp_path: Path) -> None:
    runs = seed_runs(tmp_path)
    table = invoke(*runs).stdout
    assert "per-seed speed-ups against 00001-vanilla" in table
    assert "26 (between 10: 14.00 and 30: 9.00)" in table and "50 (between 30: 14.00 and 50: 10.00)" in table
    assert "1.67x" in table and "1.09x – 1.92x" in table and "2000 resamples" in table
    rows = list(csv.DictReader(io.StringIO(invoke(*runs, "--csv").stdout)))
    assert [r["kind"] for r in rows] == ["group", "group", "seed pair", "seed pair", "seed pair"]
    group, pairs = rows[1], {int(r["seed"]): r for r in rows[2:]}
    assert float(group["seed_median_speedup"]) == pytest.approx(50 / 30) and group["seed_pairs"] == "3"
    assert float(group["seed_interval_low"]) <= float(group["seed_median_speedup"]) <= float(
        group["seed_interval_high"])
    assert pairs[1]["run"] == "00011-knn" and pairs[1]["group"] == "00010-knn"
    assert float(pairs[1]["speedup"]) == pytest.approx(50 / 26) and pairs[1]["target_before_fid"] == "14.0"


def test_plot_of_seed_groups_draws_each_seed(tmp_path: Path) -> None:
    target = tmp_path / "seeds.png"
    result = invoke(*seed_runs(tmp_path), "--plot", target)
    assert result.exit_code == 0 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_seed_group_is_named_by_what_its_members_share_without_their_seed(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"{i:05d}-{name}", VANILLA[seed] if name.startswith("van") else KNN_CURVES[seed],
                     seed=seed, assigner=None if name.startswith("van") else KNN)
            for i, (name, seed) in enumerate([("vanilla-s0", 0), ("vanilla-s1", 1), ("knn8-seed0", 0),
                                              ("knn8-seed1", 1)])]
    study_named = []
    for path in runs:  # as `immiscible study` names them: runs/vanilla-s0, ...
        study_named.append(path.rename(tmp_path / path.name.split("-", 1)[1]))
    document = as_json(*study_named)
    assert [r["run"] for r in document["runs"]] == ["vanilla", "knn8"]
    assert document["baseline"] == "vanilla" and document["runs"][1]["seeds"]["baseline"] == "vanilla"
    # names that do not end in their seed (numbered run folders) keep the first member's name
    (tmp_path / "numbered").mkdir()
    assert [r["run"] for r in as_json(*seed_runs(tmp_path / "numbered"))["runs"]] == ["00001-vanilla", "00010-knn"]
    # a run whose folder is called like the group's stem keeps its name, and the group its first member's
    other = make_run(tmp_path, "00009-other", KNN_CURVES[0], assigner={"name": "knn", "k": 4})
    other = other.rename(tmp_path / "vanilla")
    assert [r["run"] for r in as_json(*study_named, other)["runs"]] == ["vanilla-s0", "knn8", "vanilla"]
    # two groups that would share a name keep their first members' names, and so do names that differ, or that
    # end in a longer number than the seed (exp10 is not exp1 + seed 0)
    (tmp_path / "b").mkdir()
    again = [make_run(tmp_path / "b", f"0000{s}-x", VANILLA[s], seed=s, assigner={"name": "knn", "k": 2})
             for s in (0, 1)]
    again = [p.rename(p.parent / f"vanilla_s{s}") for s, p in zip((0, 1), again)]
    named = [r["run"] for r in as_json(*study_named[:2], *again)["runs"]]
    assert named == ["vanilla-s0", "vanilla_s0"]
    (tmp_path / "c").mkdir()
    odd = [make_run(tmp_path / "c", f"0000{s}-x", VANILLA[s], seed=s, assigner={"name": "knn", "k": 2})
           for s in (0, 1)]
    odd = [p.rename(p.parent / name) for p, name in zip(odd, ("exp10", "exp11"))]
    assert [r["run"] for r in as_json(*study_named[:2], *odd)["runs"]] == ["vanilla", "exp10"]
    mixed = [odd[0].rename(odd[0].parent / "alpha-s0"), odd[1].rename(odd[1].parent / "beta-s1")]
    assert [r["run"] for r in as_json(*study_named[:2], *mixed)["runs"]] == ["vanilla", "alpha-s0"]
