"""How a comparison is printed: the rich tables and the CSV text of `immiscible compare`.

compare.py computes the rows (one dict per run or seed group, the same dicts the JSON output holds); this module only
formats them, so the numbers in the table, the CSV and the JSON are the same numbers. The first table compares mean
curves; when seed groups were paired by seed, a second lists every pair and a third each group's median, spread and
bootstrap interval.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Iterable

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .compare_seeds import LEVEL, MIN_REACHED
from .console import show_table


def _kimg_text(kimg: float) -> str:
    return f"{kimg:,.0f}" if kimg >= 100 else f"{kimg:.3g}"


def _fid_text(fid: float, std: float | None = None, interpolated: bool = False) -> str:
    return f"{fid:.2f}" + (f" ± {std:.2f}" if std is not None else "") + ("*" if interpolated else "")


def crossing_text(kimg: float | None, bracket: dict[str, Any] | None) -> str:
    """'40 (between 30: 12.00 and 50: 8.00)': the kimg and the FID points either side; '10† (first point: 14.00)'
    when the first point already met the target; 'not reached'."""
    if kimg is None or bracket is None:
        return "not reached"
    before, after = bracket["before"], bracket["after"]
    if before is None:
        return f"{_kimg_text(kimg)}† (first point: {after['fid']:.2f})"
    return (f"{_kimg_text(kimg)} (between {_kimg_text(before['kimg'])}: {before['fid']:.2f} and "
            f"{_kimg_text(after['kimg'])}: {after['fid']:.2f})")


def _speedup_text(row: dict[str, Any], key: str) -> str:
    if row["kimg_to_target"] is None:
        return "not reached"
    return "n/a" if row[key] is None else f"{row[key]:.2f}x"  # n/a: the baseline never reached it, or no train_s


def _ratio(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}x"


def _table(headers: Iterable[str], rows: Iterable[list[str]], left: tuple[str, ...]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
    for header in headers:
        table.add_column(header, justify="left" if header in left else "right")
    for cells in rows:
        table.add_row(*(Text(cell) for cell in cells))  # Text: run names are never read as rich markup
    return table


def _mean_rows(rows: list[dict[str, Any]]) -> Iterable[list[str]]:
    for row in rows:
        yield [row["run"], row["assigner"], str(row["objective"]), str(row["batch_size"]), str(row["n_seeds"]),
               _kimg_text(row["kimg_trained"]),
               f"{_fid_text(row['best_fid'], row['best_fid_std'])} @ {_kimg_text(row['best_kimg'])}",
               _fid_text(row["final_fid"], row["final_fid_std"]),
               *(_fid_text(p["fid"], p["fid_std"], p["interpolated"]) for p in row["fid_at_kimg"]),
               crossing_text(row["kimg_to_target"], row["target_bracket"]),
               _speedup_text(row, "speedup"), _speedup_text(row, "speedup_wallclock")]


def _pair_speedup(pair: dict[str, Any]) -> str:
    return "n/a (baseline not reached)" if pair["status"] == "baseline not reached" else _ratio(pair["speedup"])


def _pair_rows(blocks: list[dict[str, Any]]) -> Iterable[list[str]]:
    for block in blocks:
        for p in block["pairs"]:
            yield [p["baseline_run"], p["run"], str(p["seed"]), f"{p['target']:.2f}",
                   crossing_text(p["baseline_kimg_to_target"], p["baseline_bracket"]),
                   crossing_text(p["kimg_to_target"], p["bracket"]), _pair_speedup(p)]


def _interval_text(block: dict[str, Any]) -> str:
    interval = block["interval"]
    if interval is None:
        return f"n/a ({block['n_reached']} reached)"
    return f"{_ratio(interval['low'])} – {_ratio(interval['high'])}"


def _summary_rows(rows: list[dict[str, Any]]) -> Iterable[list[str]]:
    for row in rows:
        block = row["seeds"]
        if block is None:
            continue
        rated = block["n_pairs"] - block["n_baseline_not_reached"]
        median = "n/a" if rated == 0 else _ratio(block["median"])
        spread = "n/a" if rated == 0 else f"{_ratio(block['min'])} – {_ratio(block['max'])}"
        yield [row["run"], str(block["n_pairs"]), str(block["n_not_reached"]), median, spread, _interval_text(block)]


def _seed_notes(blocks: list[dict[str, Any]]) -> list[str]:
    first = blocks[0]
    source = "--target" if first["target_source"] == "--target" else "each baseline seed's own best FID"
    interval = next((b["interval"] for b in blocks if b["interval"]), None)
    unavailable = f"n/a with fewer than {MIN_REACHED} reached pairs"
    notes = [f"per seed: runs sharing a seed (so their random numbers) paired with the baseline's; target = {source}; "
             f"median over the pairs with 'not reached' ranked below every speed-up (so the median is 'not reached' "
             f"when at least half the pairs are), never dropped"]
    if interval is not None:
        notes.append(f"interval: percentile bootstrap of the median, {interval['level']:.0%}, {interval['resamples']} "
                     f"resamples of the seed pairs with replacement, RNG seed {interval['rng_seed']}; {unavailable}")
    else:
        notes.append(f"interval: percentile bootstrap of the median, {unavailable}")
    if any(b["n_baseline_not_reached"] for b in blocks):
        notes.append("n/a (baseline not reached): that baseline seed never reached --target, so the pair has no "
                     "speed-up; counted in pairs, left out of the median, spread and interval")
    unpaired = [f"{u['run']} (seed {u['seed']})" for b in blocks for u in b["unpaired"]]
    if unpaired:
        notes.append(f"left out, no same-seed partner: {', '.join(dict.fromkeys(unpaired))}")
    return notes


def _print_notes(notes: list[str], out: Console) -> None:
    for note in notes:
        out.print(note, markup=False, highlight=False)


def _mean_notes(document: dict[str, Any]) -> list[str]:
    """The footnotes of the mean-curve table: the target, how speed-up is read, and each mark used."""
    rows, target = document["runs"], document["target"]
    source = "the baseline's best FID" if document["target_source"] != "--target" else "--target"
    notes = [f"target FID {target:.2f} ({source}); baseline {document['baseline']}; speed-up = baseline kimg to the "
             f"target / this run's kimg, interpolated between the two FID points shown as (kimg: FID), never "
             f"extrapolated; time = training seconds, FID time excluded"]
    if any(p["interpolated"] for row in rows for p in row["fid_at_kimg"]):
        notes.append("* interpolated between the run's two nearest FID points")
    if any(row["target_at_first_point"] for row in rows):
        notes.append("† already at or below the target at its first FID point: it may have got there earlier "
                     "(nothing is extrapolated)")
    if any(row["n_seeds"] > 1 for row in rows):
        notes.append("n > 1: runs that differ only in their seed; mean ± std over seeds, speed-up from the mean "
                     "curve")
    if document.get("where"):
        notes.append(f"only the FID points scored with {', '.join(document['where'])} (--where)")
    return notes


def _print_seed_tables(document: dict[str, Any], out: Console) -> None:
    """Every seed pair, then each group's median, spread and interval; nothing when no group was paired."""
    rows = document["runs"]
    blocks = [row["seeds"] for row in rows if row["seeds"] is not None]
    if not blocks:
        return
    out.print(f"\nper-seed speed-ups against {document['baseline']}:", markup=False, highlight=False)
    show_table(out, _table(["baseline run", "run", "seed", "target FID", "baseline kimg to target",
                            "run kimg to target", "speed-up"], _pair_rows(blocks), ("baseline run", "run")))
    out.print("")
    show_table(out, _table(["run", "seed pairs", "not reached", "median speed-up", "spread (min – max)",
                            f"{LEVEL:.0%} interval (bootstrap)"], _summary_rows(rows), ("run",)))
    _print_notes(_seed_notes(blocks), out)


def print_table(document: dict[str, Any], out: Console) -> None:
    """The comparison as rich tables on `out`, with footnotes saying how to read them."""
    rows, target = document["runs"], document["target"]
    headers = ["run", "assigner", "objective", "batch", "n", "kimg", "best FID @ kimg", "final FID",
               *(f"FID @ {_kimg_text(p['kimg'])} kimg" for p in rows[0]["fid_at_kimg"]),
               f"kimg to FID {target:.2f}", "speed-up", "speed-up (time)"]
    show_table(out, _table(headers, _mean_rows(rows), ("run", "assigner", "objective")))
    _print_notes(_mean_notes(document), out)
    _print_seed_tables(document, out)


# ------------------------------------------------------------------------------------------------------------------
# the CSV

_BRACKET = ("before_kimg", "before_fid", "after_kimg", "after_fid")
_SEEDS = ("seed_pairs", "seed_not_reached", "seed_median_speedup", "seed_median_status", "seed_speedup_min",
          "seed_speedup_max", "seed_interval_low", "seed_interval_high", "seed_interval_level",
          "seed_interval_resamples")


def _bracket_values(prefix: str, bracket: dict[str, Any] | None) -> dict[str, Any]:
    """target_before_kimg, ...: the crossing's two FID points as plain numbers (empty when not reached)."""
    before, after = (bracket or {}).get("before") or {}, (bracket or {}).get("after") or {}
    return {f"{prefix}_before_kimg": before.get("kimg"), f"{prefix}_before_fid": before.get("fid"),
            f"{prefix}_after_kimg": after.get("kimg"), f"{prefix}_after_fid": after.get("fid")}


def _seed_values(block: dict[str, Any] | None) -> dict[str, Any]:
    if block is None:
        return {}
    interval = block["interval"] or {}
    rated = block["n_pairs"] - block["n_baseline_not_reached"]
    return dict(zip(_SEEDS, [block["n_pairs"], block["n_not_reached"], block["median"],
                             "n/a" if rated == 0 else "not reached" if block["median_not_reached"] else "reached",
                             block["min"], block["max"], interval.get("low"), interval.get("high"),
                             interval.get("level"), interval.get("resamples")]))


def _pair_values(row: dict[str, Any], pair: dict[str, Any]) -> dict[str, Any]:
    return {**{key: row[key] for key in ("assigner", "objective", "batch_size")}, **pair, "kind": "seed pair",
            "group": row["run"], "n_seeds": 1, "target_fid": pair["target"],
            **_bracket_values("target", pair["bracket"]), **_bracket_values("baseline", pair["baseline_bracket"])}


def csv_text(document: dict[str, Any]) -> str:
    """The comparison as CSV: one header line, one line per run or seed group (kind "group"), then one per seed pair
    (kind "seed pair", its group in `group`); plain numbers, empty = none (a not-reached crossing included)."""
    rows = document["runs"]
    shared = [f"fid_at_{p['kimg']:g}kimg" for p in rows[0]["fid_at_kimg"]]
    header = ["run", "assigner", "objective", "batch_size", "n_seeds", "kimg_trained", "best_fid", "best_fid_std",
              "best_kimg", "final_fid", "final_fid_std", *shared, "target_fid", "kimg_to_target",
              "seconds_to_target", "speedup", "speedup_wallclock", *(f"target_{b}" for b in _BRACKET), "kind",
              "group", "seed", "status", "baseline_run", "baseline_kimg_to_target",
              *(f"baseline_{b}" for b in _BRACKET), *_SEEDS]
    base = next(row for row in rows if row["run"] == document["baseline"])
    lines = [{**row, **{name: p["fid"] for name, p in zip(shared, row["fid_at_kimg"])}, "kind": "group",
              "group": row["run"], "target_fid": document["target"], "baseline_run": document["baseline"],
              "baseline_kimg_to_target": base["kimg_to_target"], **_bracket_values("baseline", base["target_bracket"]),
              "status": "not reached" if row["kimg_to_target"] is None else "reached",
              "seed": row["member_seeds"][0] if row["n_seeds"] == 1 else None,
              **_bracket_values("target", row["target_bracket"]), **_seed_values(row["seeds"])} for row in rows]
    lines += [_pair_values(row, pair) for row in rows for pair in (row["seeds"] or {}).get("pairs", [])]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(lines)
    return buffer.getvalue()
