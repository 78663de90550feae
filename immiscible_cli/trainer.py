"""Training a run: `train` opens or creates the run directory, builds the training loop, resumes it from the newest
snapshot that fits and runs it to train.total_kimg. The loop is in layers, each its own module:
- train_state.py: the state a snapshot holds (networks, optimizer, random streams, data position, counters), how it
  is built from the config, saved and restored (on another device or number of processes too);
- train_step.py: one step (pair, loss, backward, clip, Adam, EMA) of that state;
- train_loop.py: when to tick, snapshot and score (`TrainingLoop.run_loop`);
with train_batches.py (each step's paired batch), train_ranks.py (what changes with several processes) and
train_report.py (status lines and loggers). Several processes (torchrun) share each global batch by rows and rank 0
alone writes the run.
"""

from __future__ import annotations

from pathlib import Path

from . import assigners, checkpoint, distributed, latents, loggers, run_create, runs, train_ranks, vae
from .config import Config
from .data import check_classes, load_images
from .errors import UserError
from .networks import expected_snapshot, pick_device
from .train_loop import Scorer, TrainingLoop
from .train_report import Reporter


def check_before_work(cfg: Config) -> None:
    """What fails before any work or write: an optional solver (assigner) or logger extra that is not installed,
    a batch the processes cannot share (train_ranks.split_batch), latents that do not fit the model or a VAE that
    is missing or not theirs (latents.check_training_vae)."""
    assigners.check_available(cfg.assigner)
    loggers.check_available(cfg.train.loggers)
    train_ranks.split_batch(cfg, distributed.world())
    latents.check_training_vae(cfg)


def train(cfg: Config, out_root: Path, run_dir: Path | None = None, resume: bool = False,
          scorer: Scorer | None = None, argv: list[str] | None = None, console=None) -> runs.Run:
    """Train `cfg` into a new numbered run under out_root, or into run_dir: continued when it already holds this
    run (or, with resume=True, that run with the fields RESUMABLE_OVERRIDES allows changed). `scorer`, when given,
    makes an FID point every cfg.eval.every_kimg; its rows go to the run's fid.jsonl."""
    from .runs import append_fid_row, read_fid_rows

    device = pick_device(cfg.train.device)
    check_before_work(cfg)
    data = load_images(cfg.data)  # a missing dataset fails here, before any directory is made
    try:
        check_classes(data, cfg.model.num_classes)  # a conditional model needs a class for every image's label
    except UserError as e:
        raise distributed.everywhere(e) from None
    decoding = latents.training_vae(cfg, device)  # latents: (header, VAE) checked before any directory is made
    continued = run_dir is not None and (resume or runs.holds_run(run_dir))
    run = distributed.on_main(lambda: _open_or_create(cfg, out_root, run_dir, resume, argv, device))
    with distributed.main_context(run.lock):  # several processes: rank 0 alone writes the run directory
        if continued:  # under the lock: a second process refused by it records nothing
            distributed.on_main(lambda: record_continuation(run, argv, str(device)))
        loop = TrainingLoop(cfg, run, data, device, scorer,
                            fid_sink=lambda row: distributed.on_main(lambda: append_fid_row(run, row)))
        if decoding is not None:  # the grids and FID points decode with it; meta.json says which VAE it is
            header, decoder = decoding
            vae.attach(loop.ema, decoder)
            record = {**header.record(), "vae": decoder.identity.record()}
            distributed.on_main(lambda: run.update_meta(latents=record))
        reporter = Reporter(run, cfg, console) if distributed.is_main() else train_ranks.SilentReporter(run, cfg)
        with reporter:
            if loop.world > 1 or loop.micro < loop.share:
                reporter.note(f"{loop.world} process(es) x {loop.share} images per step, {loop.micro} per pass; "
                              f"assignment scope {train_ranks.scope(cfg)}")
            _restore(loop, run, reporter)
            for message in loop.notes:  # settings ignored on this device; random streams a resume could not restore
                reporter.note(message)
            if resume:  # only once the new config has built and restored the loop
                distributed.on_main(lambda: run.config() != cfg and run.write_config(cfg))
            distributed.on_main(lambda: reporter.use(loggers.open_loggers(cfg, run, loop.nimg)))  # rank 0 logs
            scored = distributed.on_main(lambda: frozenset(round(float(r["kimg"]), 6) for r in read_fid_rows(run)))
            loop.run_loop(reporter, scored)
    return run


CONTINUATION_FIELDS = ("argv", "immiscible_version", "torch_version", "git_sha", "git_dirty", "device", "start_time")


def record_continuation(run: runs.Run, argv: list[str] | None, device: str) -> None:
    """meta.json of a run being continued: each continuation appends what ran it (`continued`: argv, versions, git
    commit and dirtiness, device, time), since the code may have changed since the first start; a run whose
    meta.json is missing gets one again (its `start_time` then says when it was rewritten)."""
    from .provenance import provenance

    now = provenance(argv, device)
    if not (run.path / runs.META).exists():
        run.update_meta(**now, meta_rewritten=True)
        return
    earlier = run.meta().get("continued")
    run.update_meta(continued=[*(earlier if isinstance(earlier, list) else []),
                               {key: now.get(key) for key in CONTINUATION_FIELDS}])


def _open_or_create(cfg: Config, out_root: Path, run_dir: Path | None, resume: bool, argv, device) -> runs.Run:
    world = distributed.world()
    if run_dir is None:
        return train_ranks.record_processes(run_create.create_run(out_root, cfg, argv, str(device)), cfg, world)
    if resume or runs.holds_run(run_dir):
        run = runs.open_run(run_dir)
        if not resume and run.config().digest() != cfg.digest():
            raise UserError(f"{run_dir}: holds a run with another config; continue it with `immiscible train "
                            f"--resume {run_dir}` or pick a new --run-dir")
        return run
    return train_ranks.record_processes(run_create.create_run_at(Path(run_dir), cfg, argv, str(device)), cfg, world)


def _restore(loop: TrainingLoop, run: runs.Run, reporter: Reporter) -> None:
    # we hold the run's lock: no snapshot is being written
    for path in distributed.on_main(lambda: checkpoint.remove_leftovers(run)):
        reporter.note(f"removed {path.name}, left by a write that was killed")
    resumed = checkpoint.resume(run, loop.load_state_dict, map_location=loop.device,
                                expected=expected_snapshot(loop.cfg))  # one process or several
    if resumed is None:
        return
    for message in resumed.skipped:
        reporter.note(f"skipping {message}")
    reporter.note(f"resumed from {resumed.checkpoint.path.name} (step {loop.step}, {loop.nimg / 1000:g} kimg)"
                  + (f"; dropped {resumed.dropped_rows} log rows written after it" if resumed.dropped_rows else ""))
    note = train_ranks.resumed_note(loop.saved_world)
    if note:
        reporter.note(note)
