"""The run-directory format: the only module that knows its file names.

A run directory describes itself (resolved config, provenance, append-only logs):

    runs/00007-cifar10-knn/
      config.yaml      the resolved config (reload with `Run.config()`)
      meta.json        provenance: argv, versions, git SHA, device, start time; a latent run's `latents` (its
                       file, source images and VAE: latents.LatentHeader.record)
      log.txt          tee'd log, one fixed-field status line per tick
      metrics.jsonl    one row per tick (training statistics)
      fid.jsonl        one row per FID evaluation (the curve), with every setting next to the number (below)
      checkpoints/     snapshot-000012.800kimg.pt (written atomically; owned by checkpoint.py)
      samples/         grid-000012.800kimg.png
      train.lock       held (flock) by the process training into this directory, or `eval` while it scores
      *.jsonl.damaged  cut-off last lines a crash left in a JSONL file, moved here by its next writer (files.py)

`train` creates runs (run_create.py, with these names); `sample`, `eval` and `compare` only read them (and `eval` appends to fid.jsonl, holding
train.lock while it scores, so it never runs beside a trainer or another eval of the run).

A fid.jsonl row (written by metrics/scorer.py):
    kimg, step, fid, [kid], num_images, mode ("clean" | "legacy_tensorflow"),
    reference {"name", "split", "num_images", "mode", ["resolution", "file"]}, sampler, steps, guidance,
    sampling {"eta", "clip_x0", "ddim_grid", "ode_atol", "ode_rtol"} (every objective's other sampler fields that
    change the samples, objectives.SAMPLER_FIELDS; null where the sampler does not use it; "noise": per-image | counter and "precision": fp32 | bf16, the
    generator's), ema (bool), weights {"source", "sha256", "dtype"}, inception_precision (fp32 | fp16, the run
    dtype of the Inception network), decoder (latent runs only: their VAE, {"config_sha256", "weights_sha256",
    "scaling_factor", "shift_factor"}, with its folder in `decoder_path`, not a setting), frechet
    ("eigh": stats.frechet_distance_eigh; rows without it used scipy's sqrtm, equal to 1e-3; not a setting), settings added later are absent from older rows (SETTING_DEFAULTS),
    nfe (network evaluations per image, mean over batches), seconds (scoring time),
    train_s (training seconds elapsed at that checkpoint, FID time excluded), time (unix seconds).
Only rows with equal `fid_settings` are comparable. Reading a run needs no torch (compare, study status).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator


from .config import Config, load_run_config, read_yaml
from .errors import UserError
from .files import (FileFormatError, RowSchema, append_jsonl, check_own_file, read_jsonl, repair_jsonl, write_atomic,
                    write_jsonl)

CONFIG = "config.yaml"
META = "meta.json"
LOG = "log.txt"
METRICS = "metrics.jsonl"
FID = "fid.jsonl"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
LOCK = "train.lock"

_RUN_NAME = re.compile(r"^(\d{5,})-(.+)$")

# What the readers of the logs rely on (compare, study, eval, resume), checked on every read: a row that does not fit
# is an error naming the file and line. The trainer and metrics/scorer.py write the rows.
NUMBER, NUMBER_OR_NULL, INTEGER = ("number",), ("number", "null"), ("integer",)
METRICS_ROW = RowSchema(required={"kimg": NUMBER}, optional={"loss": NUMBER, "img_per_s": NUMBER, "train_s": NUMBER})
FID_ROW = RowSchema(required={"kimg": NUMBER, "fid": NUMBER},
                    optional={"num_images": INTEGER, "kid": NUMBER, "seconds": NUMBER, "train_s": NUMBER_OR_NULL})


# The settings that make two FID numbers comparable: every fid.jsonl row carries them next to `fid`.
FID_SETTINGS = ("mode", "num_images", "reference", "sampler", "steps", "guidance", "sampling", "ema", "weights",
                "inception_precision")
# Settings only some rows carry, compared where present: a latent run's VAE (pixel rows have none, so they and every
# comparison written before it read as before)
OPTIONAL_SETTINGS = ("decoder",)
# Settings added later, with the value every row written before them had: a row lacking one means this value.
SETTING_DEFAULTS: dict[str, Any] = {
    "sampling": {"noise": "per-image", "precision": "fp32", "start_std": 1.0, "start": "standard"},
    "inception_precision": "fp32"}


def fid_settings(row: dict[str, Any]) -> dict[str, Any]:
    """The part of a fid.jsonl row that must match for two FIDs to be comparable (settings added later filled in
    with SETTING_DEFAULTS, so older rows stay comparable; OPTIONAL_SETTINGS where the row has them)."""
    settings = {key: row.get(key, None if isinstance(SETTING_DEFAULTS.get(key), dict) else SETTING_DEFAULTS.get(key))
                for key in FID_SETTINGS}
    for key, defaults in SETTING_DEFAULTS.items():
        if isinstance(defaults, dict) and isinstance(settings[key], dict):
            settings[key] = {**defaults, **settings[key]}
    settings.update({key: row[key] for key in OPTIONAL_SETTINGS if row.get(key) is not None})
    return settings


def read_fid_rows(run: Run) -> list[dict[str, Any]]:
    """The run's fid.jsonl rows in file order (sort by kimg where order matters). A row that is not an object or
    lacks a number `kimg` or `fid` (runs.FID_ROW) is a FileFormatError naming the line; a cut-off last line is
    ignored with a warning."""
    return read_jsonl(run.fid_path(), FID_ROW)


def append_fid_row(run: Run, row: dict[str, Any]) -> None:
    """Append one row (after moving a cut-off last line aside); the caller holds the run's lock."""
    append_jsonl(run.fid_path(), row)


def kimg_tag(kimg: float) -> str:
    """Fixed-width, sortable kimg label used in file names: 12.8 -> '000012.800kimg'."""
    return f"{kimg:010.3f}kimg"


class RunError(UserError):
    """A path that is not a usable run directory, or a run that is busy; the message says which and why."""


class Run:
    """An existing run directory."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # --- reading -------------------------------------------------------------------------------------------------
    def config_path(self) -> Path:
        return self.path / CONFIG

    def config(self) -> Config:
        return load_run_config(self.config_path())

    def config_dict(self) -> dict[str, Any]:
        """config.yaml as read (ConfigError naming the file: not YAML, a duplicate key, nested too deep)."""
        return read_yaml(self.config_path())

    def meta(self) -> dict[str, Any]:
        """meta.json ({} when absent); a FileFormatError naming the file when it is not a JSON object."""
        path = self.path / META
        if not path.is_file():
            return {}
        try:
            meta = json.loads(path.read_bytes())
        except (ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict):
            raise FileFormatError(f"{path}: not a JSON object; restore it or remove it (it only records provenance)")
        return meta

    def update_meta(self, **fields: Any) -> None:
        """Add or replace top-level fields of meta.json (atomically)."""
        meta = {**self.meta(), **fields}
        write_atomic(self.path / META, (json.dumps(meta, indent=2) + "\n").encode())

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS, METRICS_ROW)

    def grid_path(self, kimg: float) -> Path:
        return self.path / SAMPLES / f"grid-{kimg_tag(kimg)}.png"

    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def fid_path(self) -> Path:
        return self.path / FID

    def log_path(self) -> Path:
        return self.path / LOG

    def lock_path(self) -> Path:
        return self.path / LOCK

    # --- appending -----------------------------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS, row)

    def log(self, line: str) -> None:
        check_own_file(self.path / LOG)
        with open(self.path / LOG, "a") as f:
            f.write(line.rstrip("\n") + "\n")

    def lock(self, purpose: str = "trained") -> "RunLock":
        """The run's lock, held by `train` ("trained") and by `eval` while it scores ("evaluated"). The files the
        holder writes are checked first (`check_files`): the error comes before any work."""
        self.check_files()
        return RunLock(self.lock_path(), purpose)

    def check_files(self) -> None:
        """ForeignFileError unless every file a run writes, repairs or locks is a regular file inside the run (or
        absent): a symlink out of the run would have it append to, cut or overwrite a file that is not its own."""
        for name in (LOCK, LOG, METRICS, FID, META, CONFIG, METRICS + ".damaged", FID + ".damaged"):
            check_own_file(self.path / name, self.path)

    def truncate_after(self, kimg: float) -> int:
        """Drop metrics and FID rows past `kimg` (written after the checkpoint a resumed run restarts from, so the
        resumed run writes them again); returns how many rows were dropped."""
        dropped = 0
        for name, schema in ((METRICS, METRICS_ROW), (FID, FID_ROW)):
            path = self.path / name
            repair_jsonl(path)  # a cut-off last line is kept in <file>.damaged, not dropped by the rewrite
            rows = read_jsonl(path, schema)
            kept = [row for row in rows if row.get("kimg", 0.0) <= kimg + 1e-9]
            if len(kept) != len(rows):
                dropped += len(rows) - len(kept)
                write_jsonl(path, kept)
        return dropped

    def write_config(self, config: Config) -> None:
        write_atomic(self.config_path(), config.to_yaml().encode())


class RunLock:
    """An exclusive flock on train.lock: released by the OS when the process ends, so a crash leaves no stale lock.
    A second holder is refused at once (never waits), told the holder's pid and what it does (`purpose`)."""

    def __init__(self, path: Path, purpose: str = "trained"):
        self.path, self.purpose = path, purpose
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        check_own_file(self.path)  # never truncate a file outside the run, never block on a FIFO
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, purpose = os.pread(fd, 64, 0).decode(errors="replace").strip().partition(" ")
            os.close(fd)  # a lock written before `purpose` was recorded holds the pid alone: a trainer's
            raise RunError(f"{self.path.parent}: already being {purpose or 'trained'} by "
                           f"{f'pid {pid}' if pid else 'another process'}; wait for it to finish or stop it "
                           f"first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.purpose}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------------------------------------------------------------
# finding runs (run_create.py makes new ones)


def numbered_runs(root: Path) -> Iterator[tuple[int, Path]]:
    """(number, folder) of every numbered run folder under root (NNNNN-name), in no order."""
    if root.is_dir():
        for p in root.iterdir():
            m = _RUN_NAME.match(p.name)
            if m and p.is_dir():
                yield int(m.group(1)), p


def holds_run(path: Path) -> bool:
    """Whether `path` holds a whole run (its config.yaml, written last: a half-made directory does not)."""
    return (Path(path) / CONFIG).is_file()


def check_text_path(path: Path, option: str = "") -> None:
    """RunError when `path` holds bytes that are not UTF-8 (os.fsdecode keeps them as lone surrogates, which cannot
    be printed or written as text)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "backslashreplace").decode()
        raise RunError(f"{option + ' ' if option else ''}{shown}: the path is not valid UTF-8; choose a name in "
                       f"UTF-8") from None


def open_run(path: Path | str) -> Run:
    """An existing run directory, or RunError saying why the path is not one."""
    path = Path(path)
    check_text_path(path)
    if not path.exists():
        raise RunError(f"{path}: no such run directory")
    if not path.is_dir() or not (path / CONFIG).is_file():
        raise RunError(f"{path}: not a run directory (no {CONFIG}); give a folder made by `immiscible train`")
    return Run(path)


def latest_run(root: Path | str = "runs") -> Run:
    """The highest-numbered run under root."""
    runs = sorted(numbered_runs(Path(root)))
    runs = [(n, p) for n, p in runs if (p / CONFIG).is_file()]
    if not runs:
        raise RunError(f"{root}: no runs found; train one with `immiscible train` or name a run directory")
    return Run(runs[-1][1])
