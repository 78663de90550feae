"""Training loggers (`train.loggers`): the tick rows, the FID curve and the snapshot grids, also sent to TensorBoard
or Weights & Biases.

`metrics.jsonl` and `fid.jsonl` are the run's record and are always written (`jsonl` in the list changes nothing);
`tensorboard` and `wandb` are optional extras (`pip install 'immiscible[tensorboard]'`, `'immiscible[wandb]'`),
checked by `check_available` before the run directory is made. What each backend gets:

    scalars  every numeric field of a metrics.jsonl row, as `train/FIELD` (the row's `step` and `time` are axes)
    fid      `fid/fid` (and `fid/kid` when scored) of every fid.jsonl row
    image    `samples/grid`: the PNG grid written at each snapshot

The x axis of everything is the number of training images seen (kimg x 1000), the axis FID curves are compared on,
so runs of different batch sizes line up. Both backends live inside the run directory and continue on resume:
TensorBoard in RUN/tensorboard/ (a resumed writer purges the events after the resumed checkpoint, so the replayed
steps are not shown twice), W&B in RUN/wandb/ with the W&B run id kept in RUN/wandb-run-id (resume="allow").
W&B runs offline (`WANDB_MODE=offline`, `wandb sync RUN/wandb/offline-run-*` uploads later) unless WANDB_MODE is
set. Under several processes rank 0 alone logs (the trainer opens the loggers on rank 0 only).
"""

from __future__ import annotations

import importlib
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Protocol

from .config import Config
from .errors import UserError
from .runs import Run

TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: the event files
WANDB_ID = "wandb-run-id"  # RUN/wandb-run-id: the W&B run id, so a resumed run continues the same W&B run
AXIS_FIELDS = ("step", "time")  # fields of a metrics row that are axes, not scalars

# backend -> (module that must import, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class LoggerMissing(UserError):
    """A logger in train.loggers whose package is not installed."""


def check_available(names: list[str]) -> None:
    """LoggerMissing (one line naming the pip command) for the first backend in `names` that cannot be imported;
    called before anything is written."""
    for name in names:
        if name not in EXTRAS:
            continue
        module, extra = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise LoggerMissing(f"train.loggers: {name} is not installed; install it with `pip install "
                                f"'immiscible[{extra}]'` (or `pip install {module}`), or remove {name} from "
                                f"train.loggers") from None


def images_seen(kimg: float) -> int:
    """The x axis: training images seen at `kimg` (an exact integer, kimg has at most 6 decimals)."""
    return round(float(kimg) * 1000)


def numeric_fields(row: dict[str, Any]) -> dict[str, float]:
    """The scalar fields of a metrics row: every int or float value except the axes (bools and nulls skipped)."""
    return {key: float(value) for key, value in row.items()
            if key not in AXIS_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Logger(Protocol):
    """What the trainer sends to a logging backend; `step` is the x axis, training images seen."""

    def scalars(self, row: dict[str, Any], step: int) -> None: ...

    def fid(self, row: dict[str, Any]) -> None: ...

    def image(self, path: Path, step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """No backend (the default `[jsonl]`, and every rank but 0): drops everything."""

    def scalars(self, row: dict[str, Any], step: int) -> None:
        pass

    def fid(self, row: dict[str, Any]) -> None:
        pass

    def image(self, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files in RUN/tensorboard/; `resumed_at` (images) purges the events logged after that point."""

    def __init__(self, run: Run, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run.path / TENSORBOARD_DIR
        # TensorBoard hides events with step >= purge_step written before this writer: those after the checkpoint
        # we resumed from (its own tick, FID point and grid, at resumed_at, were logged and stay).
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resumed_at + 1 if resumed_at else None)

    def scalars(self, row: dict[str, Any], step: int) -> None:
        for key, value in numeric_fields(row).items():
            self.writer.add_scalar(f"train/{key}", value, global_step=step, walltime=row.get("time"))

    def fid(self, row: dict[str, Any]) -> None:
        step = images_seen(row["kimg"])
        for key in ("fid", "kid"):
            if isinstance(row.get(key), (int, float)):
                self.writer.add_scalar(f"fid/{key}", float(row[key]), global_step=step, walltime=row.get("time"))
        self.writer.flush()

    def image(self, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
        self.writer.add_image("samples/grid", pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run in RUN/wandb/, offline unless WANDB_MODE says otherwise; its id in RUN/wandb-run-id."""

    def __init__(self, run: Run, cfg: Config):
        import wandb

        self.wandb = wandb
        id_file = run.path / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B ids: [a-z0-9]
        if not id_file.is_file():
            id_file.write_text(run_id + "\n")
        mode = None if os.environ.get("WANDB_MODE") else "offline"
        try:
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "immiscible"), name=run.name,
                                  id=run_id, resume="allow", dir=str(run.path), config=cfg.to_dict(), mode=mode)
        except Exception as e:  # noqa: BLE001 - wandb raises its own types (no network, no login, ...)
            reason = " ".join(str(e).split())[:160]
            raise UserError(f"train.loggers: wandb could not start ({type(e).__name__}: {reason}); run offline "
                            f"with WANDB_MODE=offline, or remove wandb from train.loggers") from None
        self.wandb_run.define_metric("images")
        for prefix in ("train/*", "fid/*", "samples/*"):
            self.wandb_run.define_metric(prefix, step_metric="images")

    def scalars(self, row: dict[str, Any], step: int) -> None:
        self.wandb_run.log({**{f"train/{k}": v for k, v in numeric_fields(row).items()}, "images": step})

    def fid(self, row: dict[str, Any]) -> None:
        values = {f"fid/{key}": float(row[key]) for key in ("fid", "kid") if isinstance(row.get(key), (int, float))}
        self.wandb_run.log({**values, "images": images_seen(row["kimg"])})

    def image(self, path: Path, step: int) -> None:
        self.wandb_run.log({"samples/grid": self.wandb.Image(str(path)), "images": step})

    def close(self) -> None:
        self.wandb_run.finish()


class Loggers:
    """Several backends behind one Logger."""

    def __init__(self, backends: list[Logger]):
        self.backends = backends

    def _each(self, call: Callable[[Logger], None]) -> None:
        for backend in self.backends:
            call(backend)

    def scalars(self, row: dict[str, Any], step: int) -> None:
        self._each(lambda b: b.scalars(row, step))

    def fid(self, row: dict[str, Any]) -> None:
        self._each(lambda b: b.fid(row))

    def image(self, path: Path, step: int) -> None:
        self._each(lambda b: b.image(path, step))

    def close(self) -> None:
        self._each(lambda b: b.close())


def open_loggers(cfg: Config, run: Run, resumed_at: int = 0) -> Logger:
    """The backends of cfg.train.loggers for `run` (jsonl needs none: the trainer writes the JSONL files);
    `resumed_at`: training images seen at the checkpoint the run resumed from (0 for a new run)."""
    names = list(dict.fromkeys(cfg.train.loggers))  # each once, in order
    check_available(names)
    backends: list[Logger] = []
    if "tensorboard" in names:
        backends.append(TensorBoardLogger(run, resumed_at))
    if "wandb" in names:
        backends.append(WandbLogger(run, cfg))
    return Loggers(backends) if backends else NullLogger()
