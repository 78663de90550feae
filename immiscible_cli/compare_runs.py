"""Reading runs for `immiscible compare`: each run's comparable FID curve, one FID settings combination for all
runs, and runs whose configs differ only in their seed merged into one seed group (an `Entry`).

Only FIDs scored with the same settings (`runs.FID_SETTINGS`) are compared; a group is compared through
its mean curve, and seed by seed (compare_seeds.py) through the `Member` runs it keeps.
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from rich.console import Console

from .compare_curves import Curve, mean_curve, value_at
from .config import ASSIGNER_SECTIONS, ConfigError, validate
from .errors import UserError
from .runs import Run, fid_settings, open_run, read_fid_rows


class CompareError(UserError):
    """Runs that cannot be compared as asked; the one-line message says why and what to do."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fid_rows(run: Run) -> list[dict[str, Any]]:
    """The run's fid.jsonl rows that hold a usable number (a failed evaluation may have written NaN)."""
    return [r for r in read_fid_rows(run) if _number(r.get("fid")) and _number(r.get("kimg"))]


def curve_from_rows(rows: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> Curve:
    """Sort by kimg (rows may be out of order; a re-scored kimg keeps its latest row). Training seconds come from the
    FID row, or else are interpolated from metrics.jsonl ticks."""
    by_kimg = {round(float(r["kimg"]), 6): r for r in rows}
    ticks = sorted((m["kimg"], m["train_s"]) for m in metrics if _number(m.get("kimg")) and _number(m.get("train_s")))
    kimg = sorted(by_kimg)
    train_s = []
    for k in kimg:
        known = by_kimg[k].get("train_s")
        from_ticks = value_at(ticks, k)
        train_s.append(float(known) if _number(known) else from_ticks[0] if from_ticks else None)
    return Curve(kimg=kimg, fid=[float(by_kimg[k]["fid"]) for k in kimg], train_s=train_s)


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
    if _number(have) and _number(want):
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


# Fields that do not change what a run learns: runs differing only here (and in seed) are seeds of one experiment.
_NOT_THE_EXPERIMENT = ("name", "seed", "data.root", "train.keep_last", "train.keep_every_kimg", "train.loggers",
                       "train.keep_network")


def experiment_key(config: dict[str, Any]) -> str:
    """The config without its seed, name and bookkeeping fields, as canonical JSON."""
    trimmed = copy.deepcopy(config)
    for dotted in _NOT_THE_EXPERIMENT:
        *parents, leaf = dotted.split(".")
        node: Any = trimmed
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(trimmed, sort_keys=True, default=str)


def assigner_label(config: dict[str, Any]) -> str:
    """'vanilla', 'knn k=8', 'knn k=8 centred', 'linear l2 fp16', 'vanilla x2' (image_scale 2)."""
    assigner = config.get("assigner") or {}
    name = assigner.get("name", "vanilla")
    section = ASSIGNER_SECTIONS.get(name) if isinstance(name, str) else None
    parts = [name, *(section.label_settings(assigner) if section is not None else [])]
    scale = assigner.get("image_scale", 1.0)
    if _number(scale) and scale != 1:
        parts.append(f"x{scale:g}")
    return " ".join(parts)


@dataclass
class Member:
    """One run of a seed group, with its own curve: what per-seed speed-ups are read from."""

    name: str
    seed: Any  # the config's `seed` (an int for runs made by `immiscible train`)
    curve: Curve


@dataclass
class Entry:
    """A run, or a group of runs that differ only in their seed, with the curve it is compared by."""

    name: str
    members: list[str]
    config: dict[str, Any]
    curve: Curve
    kimg_trained: float
    settings: dict[str, Any]
    seeds: list[Member] = field(default_factory=list)
    throughput_spread: float | None = None  # fastest over slowest tick's img/s (ticks after the first), any member

    @property
    def label(self) -> str:
        seeds = f", {len(self.members)} seeds" if len(self.members) > 1 else ""
        return f"{self.name} ({assigner_label(self.config)}{seeds})"


def _config_dict(run: Run) -> dict[str, Any]:
    config = run.config_dict()  # a file that is not YAML: a ConfigError naming it
    if not config:
        raise CompareError(f"{run.config_path()}: not a config mapping; was the run made by `immiscible train`?")
    try:  # a field added since the run was made reads as its default, the behaviour the run had: a run made by an
        return validate(config, str(run.config_path())).to_dict()  # older version is a seed of the same experiment
    except ConfigError:  # a config this version cannot read is compared as written
        return config


def _single(run: Run, name: str, rows: list[dict[str, Any]], chosen: list[dict[str, Any]]) -> Entry:
    """One run as an entry of its own (a group of one seed)."""
    metrics, config = run.metrics(), _config_dict(run)
    trained = max([r["kimg"] for r in rows] + [m["kimg"] for m in metrics if _number(m.get("kimg"))])
    curve = curve_from_rows(chosen, metrics)
    return Entry(name, [name], config, curve, float(trained), fid_settings(chosen[0]),
                 [Member(name, config.get("seed"), curve)], throughput_spread(metrics))


THROUGHPUT_SPREAD_WARNING = 2.0
"""A run whose ticks' img/s differ by more than this factor trained on a machine that was busy with other work
part of the time: compare warns that its time speed-up measures the machine as much as the method."""


def throughput_spread(metrics: list[dict[str, Any]]) -> float | None:
    """Fastest over slowest img/s of the run's ticks, the first left out (it includes start-up); None with fewer
    than two such ticks."""
    speeds = [float(m["img_per_s"]) for m in metrics[1:] if _number(m.get("img_per_s")) and m["img_per_s"] > 0]
    return max(speeds) / min(speeds) if len(speeds) >= 2 else None


def _group_name(seeds: list[Entry]) -> str:
    """A seed group's name: what its members' names share once each drops its own seed from its end (`vanilla-s0`,
    `vanilla-s1` -> `vanilla`, as `immiscible study` names runs); otherwise its first member's name."""
    if len(seeds) == 1:
        return seeds[0].name
    stems = {_stem(entry) for entry in seeds}
    stem = stems.pop() if len(stems) == 1 else None
    return stem if stem else seeds[0].name


def _split_replicates(group: list[Entry]) -> list[list[Entry]]:
    """A group in which a seed occurs twice (a run repeated under another name, e.g. `knn8-s0` and `knn8-kept-s0`)
    is split by name stem (the name without its seed, as `_group_name` reads it), so that no seed counts twice in a
    mean curve; a group whose seeds are distinct, or whose names do not separate them, stays as it is."""
    seeds = [entry.seeds[0].seed for entry in group]
    if len(set(seeds)) == len(seeds):
        return [group]
    by_stem: dict[str, list[Entry]] = {}
    for entry in group:
        by_stem.setdefault(_stem(entry) or entry.name, []).append(entry)
    parts = list(by_stem.values())
    if (len(parts) > 1 and any(len(part) > 1 for part in parts)  # the names group runs: not all-different names
            and all(len({e.seeds[0].seed for e in part}) == len(part) for part in parts)):
        return parts
    return [group]


def _stem(entry: Entry) -> str | None:
    """The entry's name without its trailing seed (`knn8-kept-s0` -> `knn8-kept`); None when it does not end in it."""
    seed = entry.seeds[0].seed
    match = re.fullmatch(rf"(.+?)[-_.]?(?:s|seed)?(?<!\d){seed}", entry.name) if isinstance(seed, int) else None
    return match.group(1) if match else None


def _merge(seeds: list[Entry]) -> Entry:
    """Runs that differ only in their seed as one entry, compared through their mean curve."""
    curve = seeds[0].curve if len(seeds) == 1 else mean_curve([s.curve for s in seeds])
    if curve is None:
        raise CompareError(f"runs {', '.join(s.name for s in seeds)} differ only in their seed but share no "
                           f"evaluated kimg range; evaluate them over a common range")
    return Entry(_group_name(seeds), [s.name for s in seeds], seeds[0].config, curve,
                 statistics.fmean(s.kimg_trained for s in seeds), seeds[0].settings,
                 [m for s in seeds for m in s.seeds],
                 max((s.throughput_spread for s in seeds if s.throughput_spread is not None), default=None))


def load_entries(runs: list[Run], names: list[str], *, strict: bool, err: Console,
                 where: Sequence[str] = ()) -> list[Entry]:
    """Read every run's comparable FID curve (only rows matching `where`) and merge seeds of one experiment into one
    entry (in given order)."""
    rows = {name: fid_rows(run) for name, run in zip(names, runs)}
    for name, run in zip(names, runs):
        if not rows[name]:
            raise CompareError(f"run {run.path} has no FID points in fid.jsonl; score it with "
                               f"`immiscible eval {run.path} --fid`")
    rows = select_rows(rows, where)
    chosen = choose_fid_rows(rows, strict=strict, err=err)
    groups: dict[str, list[Entry]] = {}
    for name, run in zip(names, runs):
        single = _single(run, name, rows[name], chosen[name])
        groups.setdefault(experiment_key(single.config), []).append(single)
    entries = [_merge(seeds) for group in groups.values() for seeds in _split_replicates(group)]
    taken = Counter(e.name for e in entries) + Counter(names)
    for entry in entries:  # a group named like a run (a folder `vanilla`) or another group keeps its first member's
        if entry.name not in entry.members and taken[entry.name] > 1:  # name, which no other entry has
            entry.name = entry.members[0]
    return entries


def open_runs(paths: list[Path], baseline: Path | None) -> tuple[list[Run], int]:
    """Each run once (a repeated path counts once) and the baseline's index. A --baseline that is not among the runs
    is added in front: friendlier than refusing, and `compare A --baseline B` reads naturally."""
    runs: list[Run] = []
    for path in paths:
        run = open_run(path)
        if all(r.path.resolve() != run.path.resolve() for r in runs):
            runs.append(run)
    if baseline is None:
        return runs, 0
    base = open_run(baseline)
    found = next((i for i, r in enumerate(runs) if r.path.resolve() == base.path.resolve()), None)
    return ([base] + runs, 0) if found is None else (runs, found)
