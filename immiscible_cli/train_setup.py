"""Preparing a training run, for `train` and `study` alike: which config and which run directory (a new one, or
one to continue), the checks that must fail before any work, the FID scorer (weights and reference statistics,
computed before anything is written), then `trainer.train`.

Create or continue: `runs.holds_run(path)` is the one test of whether a folder already holds a run. `--resume RUN`
continues RUN with its own config (RESUMABLE_OVERRIDES may change); `--run-dir DIR` continues DIR when it holds the
same run and creates it otherwise; neither makes a new numbered run under `--out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import run_create, runs
from .config import RESUMABLE_OVERRIDES, Config, load_config, with_overrides
from .console import Bars
from .errors import UserError, names_memory_field


@dataclass(frozen=True)
class Plan:
    """What `train` will do: train `cfg` into `target`, continuing the run there when `continues`."""

    cfg: Config
    target: Path
    continues: bool


def plan(preset: str | None, overrides: list[str] | None, *, out_dir: Path, run_dir: Path | None = None,
         resume: Path | None = None) -> Plan:
    """The config and run directory of `train --preset/--set/--out/--run-dir/--resume`; a UserError (nothing
    written) for options that do not fit together, a folder that cannot become a run, or a bad config."""
    if resume is not None:
        if preset or run_dir:
            raise UserError("--resume continues a run with its own config; drop --preset/--run-dir")
        run = runs.open_run(resume)
        cfg = with_overrides(run.config(), overrides, RESUMABLE_OVERRIDES) if overrides else run.config()
        return Plan(cfg, run.path, continues=True)
    cfg = load_config(preset, overrides or [])
    if run_dir is None:
        return Plan(cfg, run_create.next_run_path(out_dir, cfg.name), continues=False)
    runs.check_text_path(run_dir, "--run-dir")  # a path that cannot be written as text: one line, nothing made
    continues = runs.holds_run(run_dir)
    if not continues and run_dir.is_dir():
        run_create.check_new_run_dir(run_dir)  # a folder holding anything else: refused before any work, dry run too
    return Plan(cfg, run_dir, continues)


def train_run(cfg: Config, *, out_dir: Path, run_dir: Path | None = None, resume: bool = False,
              inception: Path | str | None = None, argv: list[str] | None = None, console=None) -> runs.Run:
    """Check, build the FID scorer, train: a new numbered run under `out_dir`, or `run_dir` (continued when it holds
    this run; with `resume`, that run with RESUMABLE_OVERRIDES changed). Returns the run."""
    from . import trainer
    from .metrics import scorer as fid_scorer
    from .networks import pick_device

    trainer.check_before_work(cfg)  # an optional solver or logger extra, a batch the processes cannot share
    oom = names_memory_field("eval.batch_size", cfg.eval.batch_size, "while computing reference statistics")
    with Bars(console) as bars, oom:  # weights and reference statistics: fail (or compute them) before any write
        scorer = fid_scorer.training_scorer(cfg, pick_device(cfg.train.device), inception=inception, progress=bars)
    return trainer.train(cfg, out_root=out_dir, run_dir=run_dir, resume=resume, scorer=scorer, argv=argv,
                         console=console)
