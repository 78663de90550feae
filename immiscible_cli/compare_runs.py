"""Reading runs for `immiscible compare`: each run's comparable FID curve (from the rows compare_rows.py chooses:
one FID settings combination for all runs) and runs whose configs differ only in their seed merged into one seed
group (an `Entry`), compared through its mean curve, and seed by seed (compare_seeds.py) through the `Member` runs
it keeps.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from .compare_curves import Curve, mean_curve, value_at
from .compare_rows import CompareError, choose_fid_rows, fid_rows, finite_number, select_rows
from .config import ASSIGNER_SECTIONS, ConfigError, validate
from .runs import Run, fid_settings, open_run


def curve_from_rows(rows: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> Curve:
    """Sort by kimg (rows may be out of order; a re-scored kimg keeps its latest row). Training seconds come from the
    FID row, or else are interpolated from metrics.jsonl ticks."""
    by_kimg = {round(float(r["kimg"]), 6): r for r in rows}
    ticks = sorted((m["kimg"], m["train_s"]) for m in metrics
                   if finite_number(m.get("kimg")) and finite_number(m.get("train_s")))
    kimg = sorted(by_kimg)
    train_s = []
    for k in kimg:
        known = by_kimg[k].get("train_s")
        from_ticks = value_at(ticks, k)
        train_s.append(float(known) if finite_number(known) else from_ticks[0] if from_ticks else None)
    return Curve(kimg=kimg, fid=[float(by_kimg[k]["fid"]) for k in kimg], train_s=train_s)


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
    if finite_number(scale) and scale != 1:
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
    trained = max([r["kimg"] for r in rows] + [m["kimg"] for m in metrics if finite_number(m.get("kimg"))])
    curve = curve_from_rows(chosen, metrics)
    return Entry(name, [name], config, curve, float(trained), fid_settings(chosen[0]),
                 [Member(name, config.get("seed"), curve)], throughput_spread(metrics))


THROUGHPUT_SPREAD_WARNING = 2.0
"""A run whose ticks' img/s differ by more than this factor trained on a machine that was busy with other work
part of the time: compare warns that its time speed-up measures the machine as much as the method."""


def throughput_spread(metrics: list[dict[str, Any]]) -> float | None:
    """Fastest over slowest img/s of the run's ticks, the first left out (it includes start-up); None with fewer
    than two such ticks."""
    speeds = [float(m["img_per_s"]) for m in metrics[1:] if finite_number(m.get("img_per_s")) and m["img_per_s"] > 0]
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
