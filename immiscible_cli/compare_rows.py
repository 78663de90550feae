"""Which FID rows `immiscible compare` reads: each run's rows that hold a number, those matching `--where`, and one
FID settings combination for all runs (`runs.FID_SETTINGS`: only FIDs scored alike are compared), with a warning
(or, with --strict, a CompareError) naming what differs when no combination is shared. compare_runs.py turns the
chosen rows into curves and seed groups.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any, Sequence

import yaml
from rich.console import Console

from .errors import UserError
from .runs import Run, fid_settings, read_fid_rows


class CompareError(UserError):
    """Runs that cannot be compared as asked; the one-line message says why and what to do."""


def finite_number(value: Any) -> bool:
    """A finite int or float, not a bool (a JSON row's number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fid_rows(run: Run) -> list[dict[str, Any]]:
    """The run's fid.jsonl rows that hold a usable number (a failed evaluation may have written NaN)."""
    return [r for r in read_fid_rows(run) if finite_number(r.get("fid")) and finite_number(r.get("kimg"))]


def _settings_key(row: dict[str, Any]) -> str:
    return json.dumps(fid_settings(row), sort_keys=True)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def describe_differences(settings_by_run: dict[str, dict[str, Any]]) -> str:
    """'num_images (a: 10000, b: 50000); sampler (...)': each setting that differs, with every run's value."""
    flat = {name: _flatten(s) for name, s in settings_by_run.items()}
    keys = sorted({key for f in flat.values() for key in f})
    parts = [f"{key} ({', '.join(f'{name}: {f.get(key)}' for name, f in flat.items())})"
             for key in keys if len({json.dumps(f.get(key)) for f in flat.values()}) > 1]
    return "; ".join(parts)


def _setting_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except RecursionError:
        raise UserError(f"--where ...={text[:20]}...: the value is nested too deep; give a number or a word") from None


def _same(have: Any, want: Any) -> bool:
    if finite_number(have) and finite_number(want):
        return math.isclose(float(have), float(want), rel_tol=1e-9, abs_tol=0.0)
    return have == want


def select_rows(rows_by_run: dict[str, list[dict[str, Any]]],
                where: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Only the FID rows whose settings match every `--where FIELD=VALUE` (FIELD as fid.jsonl names it, dotted:
    `sampling.start_std`, `num_images`, `reference.num_images`; VALUE read as YAML). A FIELD no row has, or a run
    left without rows, is a CompareError saying what there is."""
    if not where:
        return rows_by_run
    flat = {name: [_flatten(fid_settings(r)) for r in rows] for name, rows in rows_by_run.items()}
    known = sorted({key for rows in flat.values() for row in rows for key in row})
    conditions = []
    for condition in where:
        field_name, sep, value = condition.partition("=")
        field_name = field_name.strip()
        if not sep or field_name not in known:
            raise CompareError(f"--where {condition}: expected FIELD=VALUE with FIELD one of the FID settings "
                               f"({', '.join(known)})")
        conditions.append((field_name, _setting_value(value)))
    kept = {}
    for name, rows in rows_by_run.items():
        kept[name] = [row for row, settings in zip(rows, flat[name])
                      if all(_same(settings.get(key), want) for key, want in conditions)]
        if not kept[name]:
            raise CompareError(f"run {name} has no FID point with {' and '.join(where)}; score it with those "
                               f"settings (`immiscible eval RUN --fid --set ...`) or drop it")
    return kept


def choose_fid_rows(rows_by_run: dict[str, list[dict[str, Any]]], *, strict: bool,
                    err: Console) -> dict[str, list[dict[str, Any]]]:
    """Keep one FID settings combination per run: the one all runs share (the one with most points if several are,
    the one written first on a tie), else each run's most common one, with a warning naming what differs (a
    CompareError when strict)."""
    counts = {name: Counter(_settings_key(r) for r in rows) for name, rows in rows_by_run.items()}
    shared = set.intersection(*(set(c) for c in counts.values()))
    if shared:  # most points; on a tie the combination written first (a run's own, before any `eval --set` rows)
        first: dict[str, int] = {}
        for rows in rows_by_run.values():
            for i, row in enumerate(rows):
                key = _settings_key(row)
                first[key] = min(first.get(key, i), i)
        best = max(sorted(shared), key=lambda key: (sum(c[key] for c in counts.values()), -first[key]))
        chosen = dict.fromkeys(counts, best)
    else:
        chosen = {name: c.most_common(1)[0][0] for name, c in counts.items()}
        differences = describe_differences({name: json.loads(key) for name, key in chosen.items()})
        if strict:
            raise CompareError(f"FID settings differ and no combination is shared by all runs: {differences}; "
                               f"score them alike with `immiscible eval`, or drop --strict")
        err.print(f"warning: FID settings differ, so these FIDs are not strictly comparable: {differences} "
                  f"(--strict refuses this)", markup=False, highlight=False)
    return {name: [r for r in rows if _settings_key(r) == chosen[name]] for name, rows in rows_by_run.items()}
