"""`immiscible study FILE`: presets x seeds x overrides in one command, resumable, with a comparison report.

A study file (YAML, validated like presets) names runs, each a preset plus `--set` overrides, the seeds each runs
with, the comparison baseline and an optional target FID. `run_study` trains what is missing or unfinished (a run
directory that already holds the same config is continued from its newest checkpoint, so rerunning after a crash or
a kill -9 goes on where it stopped), with FID points during training, then writes into the study folder:
`comparison.txt` (the `compare` table), `comparison.json`, `curves.png` and `report.md`.

Study folder layout: <out>/study.yaml (a copy of the file), <out>/runs/<run>-s<seed>/ (ordinary run directories),
<out>/study.log (one line per run started, resumed or finished, with wall times).
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console

from . import runs
from .config import (RESUMABLE_OVERRIDES, SAMPLING_OVERRIDES, Config, ConfigError, changed_fields, load_config,
                     read_yaml, resumable, with_overrides)
from .errors import UserError
from .files import write_atomic

DEFAULT_ROOT = Path("runs")


class StudyRun(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    preset: str | None = None
    """Preset name or YAML path; None = the study's `preset`."""
    set: list[str] = Field(default_factory=list)
    """`section.field=value` overrides, applied after the study's own `set`."""
    seeds: list[int] | None = Field(None, min_length=1)
    """Seeds of this run; None = the study's `seeds`."""
    rescore: list[list[str]] = Field(default_factory=list)
    """Extra FID points of the finished run's last weights, one per list of sampling `--set` overrides (as
    `immiscible eval RUN --fid --ckpt latest --set ...`), e.g. [[sample.start=matched]]; their rows sit in the run's
    fid.jsonl beside its curve. A member without weights (snapshots and kept network gone) is skipped, with a line
    in study.log."""


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)  # target finite

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Study name; the study folder is runs/study-<name> unless --out says otherwise."""
    preset: str | None = None
    """Default preset of every run."""
    set: list[str] = Field(default_factory=list)
    """Overrides applied to every run."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Default seeds (config field `seed`); runs with the same seed share their random numbers."""
    runs: dict[str, StudyRun] = Field(min_length=2)
    """Run name -> preset, overrides, seeds. Runs are trained seed by seed, in this order."""
    baseline: str
    """The run the others are compared with (speed-up = its kimg to the target / theirs)."""
    target: float | None = Field(None, gt=0)
    """FID to reach; None = the baseline's best FID (per seed in the per-seed speed-ups)."""

    @model_validator(mode="after")
    def _known_baseline(self) -> "Study":
        if self.baseline not in self.runs:
            raise ValueError(f"baseline: '{self.baseline}' is not one of the runs ({', '.join(self.runs)})")
        for name in self.runs:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"runs.{name}: run names use ASCII letters, digits, '-' and '_' only")
        return self

    def members(self) -> list[tuple[str, int]]:
        """(run, seed) in training order: seed by seed, runs in file order within a seed."""
        seeds = sorted({s for run in self.runs.values() for s in (run.seeds or self.seeds)})
        return [(name, seed) for seed in seeds for name, run in self.runs.items() if seed in (run.seeds or self.seeds)]

    def config(self, name: str, seed: int) -> Config:
        run = self.runs[name]
        preset = run.preset or self.preset
        if preset is None:
            raise ConfigError(f"runs.{name}: no preset (set `preset` for the study or for this run)")
        return load_config(preset, [*self.set, *run.set, f"name={name}", f"seed={seed}"])


def load_study(path: Path) -> Study:
    """A validated study file, or ConfigError naming the file and the field."""
    raw = read_yaml(Path(path))
    try:
        study = Study.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: {'.'.join(str(p) for p in err['loc']) or 'study'}: "
                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None
    for name, seed in study.members():  # every run's config validates before anything runs
        cfg = study.config(name, seed)
        for overrides in study.runs[name].rescore:
            try:
                with_overrides(cfg, overrides, SAMPLING_OVERRIDES, "--set")
            except ConfigError as e:
                raise ConfigError(f"{path}: runs.{name}.rescore: {e}") from None
    return study


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}-s{seed}"


def default_out(study: Study) -> Path:
    return DEFAULT_ROOT / f"study-{study.name}"


# ------------------------------------------------------------------------------------------------------------------
# status and cost


def status(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per (run, seed): its folder, kimg trained of the total, FID points done of those due."""
    rows = []
    for name, seed in study.members():
        cfg, path = study.config(name, seed), run_dir(out, name, seed)
        run = runs.Run(path)  # maybe not made yet: no rows then
        metrics, fid = run.metrics(), runs.read_fid_rows(run)
        every, total = round(cfg.eval.every_kimg * 1000), round(cfg.train.total_kimg * 1000)  # in images
        due = total // every if 0 < every <= total else 0
        points = {round(float(r["kimg"]) * 1000) // every for r in fid if every > 0 and "kimg" in r}
        done_kimg = max((m.get("kimg", 0.0) for m in metrics), default=0.0)
        rows.append({"run": name, "seed": seed, "path": str(path), "kimg": done_kimg,
                     "total_kimg": cfg.train.total_kimg, "fid_points": len(points & set(range(1, due + 1))),
                     "fid_due": due, "fid_images": cfg.eval.num_images,
                     "done": round(done_kimg * 1000) >= total and points >= set(range(1, due + 1)),
                     "img_per_s": _median([m["img_per_s"] for m in metrics if m.get("img_per_s")]),
                     "fid_s": _median([r["seconds"] for r in fid if r.get("seconds")])})
    return rows


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def estimate_seconds(rows: list[dict[str, Any]]) -> float | None:
    """Seconds still to spend, from the speeds measured in runs already (None before any run has ticked)."""
    speed = _median([r["img_per_s"] for r in rows if r["img_per_s"]])
    fid_s = _median([r["fid_s"] for r in rows if r["fid_s"]])
    if speed is None:
        return None
    left = sum(max(r["total_kimg"] - r["kimg"], 0.0) * 1000 / speed for r in rows)
    if fid_s is not None:
        left += sum(max(r["fid_due"] - r["fid_points"], 0) * fid_s for r in rows)
    return left


# ------------------------------------------------------------------------------------------------------------------
# running


def run_study(study: Study, source: Path, out: Path, *, console: Console, inception: Path | None = None) -> Path:
    """Train every unfinished member and add its rescore points, then write the comparison; returns the report's
    path."""
    from .trainer import check_before_work

    rows = status(study, out)
    extended = [_extended(study.config(r["run"], r["seed"]), Path(r["path"])) for r in rows]  # refuse before work
    for row in rows:  # an optional solver that is not installed fails before any work
        check_before_work(study.config(row["run"], row["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "study.yaml", Path(source).read_bytes())
    for row, extend in zip(rows, extended):
        if not row["done"]:
            _train(study, row, extend, source, out, console, inception)
        _rescore(study, row, out, console, inception)
    return write_report(study, out)


def _train(study: Study, row: dict[str, Any], extend: bool, source: Path, out: Path, console: Console,
           inception: Path | None) -> None:
    """Train (or continue) one member, with its FID points, logging start and end in study.log."""
    from .train_setup import train_run

    cfg = study.config(row["run"], row["seed"])
    began = time.time()
    _log(out, f"start {row['run']} seed {row['seed']} at {row['kimg']:g} of {row['total_kimg']:g} kimg")
    train_run(cfg, out_dir=out / "runs", run_dir=Path(row["path"]), resume=extend, inception=inception,
              argv=["immiscible", "study", str(source)], console=console)
    _log(out, f"done {row['run']} seed {row['seed']} in {time.time() - began:.0f} s")


def _rescore(study: Study, row: dict[str, Any], out: Path, console: Console, inception: Path | None) -> None:
    """The run's `rescore` points (evaluate skips those already in fid.jsonl, so a rerun costs nothing)."""
    from . import checkpoint
    from .evaluate import evaluate_runs

    run = runs.open_run(Path(row["path"]))
    device = study.config(row["run"], row["seed"]).train.device
    for overrides in study.runs[row["run"]].rescore:
        if not checkpoint.weights(run):
            _log(out, f"rescore {row['run']} seed {row['seed']} with {' '.join(overrides)}: skipped, no weights kept")
            continue
        began = time.time()
        results = evaluate_runs([run], ckpts=["latest"], num_images=None, steps=None, sampler=None, reference=None,
                                mode=None, batch=None, kid=False, inception=inception, device=device,
                                console=console, overrides=overrides)
        last = results[0]["curve"][-1] if results[0]["curve"] else None
        if last is not None and time.time() - began > 1:
            _log(out, f"rescored {row['run']} seed {row['seed']} with {' '.join(overrides)}: FID {last['fid']:.2f} "
                      f"at {last['kimg']:g} kimg in {time.time() - began:.0f} s")


def _extended(cfg: Config, path: Path) -> bool:
    """True when the run at `path` was started with a config that differs from `cfg` only in fields a started run
    may change (a study file edited to train longer, say): it is then continued with the new values. A change to
    any other field is refused, naming it."""
    if not runs.holds_run(path):
        return False
    changed = changed_fields(runs.open_run(path).config(), cfg)
    fixed = [field for field in changed if not resumable(field)]
    if fixed:
        raise ConfigError(f"{path}: the study file now gives this run another {', '.join(fixed)}; a started run "
                          f"can change only {', '.join(RESUMABLE_OVERRIDES)}; restore the file or use another --out")
    return bool(changed)


def _log(out: Path, message: str) -> None:
    with open(out / "study.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}\n")


def comparison(study: Study, out: Path, plot: Path | None = None,
               rows: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    """The `compare` table of the study's runs that have FID points (with compare's warnings after it) and its JSON
    document; `plot` also draws the curves. What `write_report` writes, and what a reader can recompute. `rows`:
    the members to compare (`status` rows; default all of them, as they are)."""
    from . import compare

    scored = [r for r in (status(study, out) if rows is None else rows) if r["fid_points"] > 0]
    paths = [Path(r["path"]) for r in scored]
    baselines = [p for r, p in zip(scored, paths) if r["run"] == study.baseline]
    baseline = baselines[0] if baselines else None
    warnings = _console()  # compare's warnings go to the report, never into the JSON
    try:
        if baseline is None or len(paths) < 2:
            raise UserError(f"the baseline {study.baseline} and at least one other run need FID points first")
        text = _captured(lambda c: compare.main(paths, target=study.target, baseline=baseline, plot=None,
                                                fmt="table", strict=True, out=c, err=warnings))
        # the plot is drawn here, where its `plot: PATH` note goes to a console thrown away: the table holds no path
        document = _captured(lambda c: compare.main(paths, target=study.target, baseline=baseline, plot=plot,
                                                    fmt="json", strict=True, out=c, err=_console()))
    except UserError as e:  # e.g. runs without FID points yet: the report says so instead of a table
        text, document = f"no comparison: {e}\n", json.dumps({"error": str(e)}) + "\n"
    return text + warnings.file.getvalue(), document


def write_report(study: Study, out: Path) -> Path:
    """comparison.txt / .json, curves.png and report.md from the study's run directories."""
    out.mkdir(parents=True, exist_ok=True)
    rows = status(study, out)
    text, document = comparison(study, out, plot=out / "curves.png")
    write_atomic(out / "comparison.txt", text.encode())
    write_atomic(out / "comparison.json", document.encode())
    lines = [f"# Study {study.name}", "", f"Runs: {len(rows)} ({', '.join(study.runs)}); seeds "
             f"{sorted({r['seed'] for r in rows})}; baseline {study.baseline}; target "
             f"{study.target if study.target is not None else 'the baseline best FID'}.", "",
             "| run | seed | kimg | FID points |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['seed']} | {r['kimg']:g} / {r['total_kimg']:g} | {r['fid_points']} / "
              f"{r['fid_due']} |" for r in rows]
    lines += ["", "## Comparison (`immiscible compare`)", "", "```", text.rstrip(), "```", "",
              "![FID curves](curves.png)", ""]
    write_atomic(out / "report.md", "\n".join(lines).encode())
    return out / "report.md"


def _console() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None, highlight=False, soft_wrap=True)


def _captured(write) -> str:
    console = _console()
    write(console)
    return console.file.getvalue()


def print_status(study: Study, out: Path, console: Console) -> None:
    """`--dry-run`: each member's state and the estimated time left, from the speeds measured so far."""
    rows = status(study, out)
    for row in rows:
        state = "done" if row["done"] else "missing" if row["kimg"] == 0 else "partial"
        console.print(f"{row['run']:>12} seed {row['seed']:<3} {state:<8} {row['kimg']:g}/{row['total_kimg']:g} kimg"
                      f"  FID {row['fid_points']}/{row['fid_due']} x {row['fid_images']} images  {row['path']}",
                      markup=False)
    seconds = estimate_seconds(rows)
    left = "unknown until a run has ticked" if seconds is None else f"about {seconds / 3600:.1f} h"
    console.print(f"# dry run: {sum(not r['done'] for r in rows)} of {len(rows)} runs to do; time left {left} "
                  f"(nothing written)", markup=False)
