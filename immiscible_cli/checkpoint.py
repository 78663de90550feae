"""Checkpoints: the snapshot files of a run directory, what they hold, how they are written (atomically), listed,
selected, pruned, read (weights_only, with fallback to an older one) and resumed from.

A snapshot is one `torch.save`d dict of tensors and plain values, so `torch.load(weights_only=True)` reads it:
    format, kimg, nimg, step, train_s, config (the resolved config as a dict), config_digest,
    net, ema (state_dicts), optimizer (state_dict),
    rng {"flips", "timesteps", "noise", "labels": generator states (trainer.STREAMS), "torch": CPU state (dropout),
         "cuda": [per-device states], "device": "cpu" | "cuda" (whose generators wrote the stream states; absent in
         older snapshots: read off their size), with several processes also "torch_ranks" and on CUDA "cuda_ranks":
         [each rank's dropout state]}, data {"epoch", "position"}, world_size (processes that trained it; absent: 1).

Snapshots move between devices (`restore_random_streams`, `portable_optimizer_state`): a run trained on CUDA
resumes on a CPU and the reverse, and on a machine with fewer GPUs. Weights and optimizer moments are mapped to the
new device; random streams are restored exactly on the same device type and reseeded (deterministically, from the
run seed and the step) on another, with a note for log.txt.

A kept network (train.keep_network) is RUN/network-<kimg>kimg.pt, written at the end of training: the same dict
without `net`, `optimizer`, `rng` and `data` (format immiscible-network-v1: the EMA weights, the config, the noise
moments). `weights` lists it beside the snapshots, so `eval` and `sample` use it like one (studies commit it, not
their snapshots); resume never does.

Before a snapshot is used it is checked against the run (`Expected`): the format tag, every key above, the tensor
names and shapes of both networks against the network config.yaml builds, and the stored config against config.yaml
(fields a resumed run may change, config.RESUMABLE_OVERRIDES, excepted). One that does not fit is skipped by
`resume` and named by `sample`/`eval` with the checkpoints that do fit.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed
from .config import Config, resumable
from .errors import UserError
from .files import own_file_problem, write_atomic
from .runs import Run, kimg_tag

FORMAT = "immiscible-snapshot-v1"
REQUIRED = ("kimg", "nimg", "step", "train_s", "config", "config_digest", "net", "ema", "optimizer", "rng", "data")
NETWORK_FORMAT = "immiscible-network-v1"
NETWORK_REQUIRED = ("kimg", "nimg", "step", "train_s", "config", "config_digest", "ema")
_NETWORK = re.compile(r"^network-(\d+\.\d{3})kimg\.pt$")
_SNAPSHOT = re.compile(r"^snapshot-(\d+\.\d{3})kimg\.pt$")
CUDA_STATE_BYTES = 16
"""Size of a CUDA (Philox) generator's state: seed and offset, 8 bytes each (a CPU generator's is 5056 bytes)."""
_LEFTOVER = re.compile(r"^\..+\.tmp-\d+$")  # files.write_atomic's temporary name: .<file>.tmp-<pid>


@dataclass(frozen=True)
class Checkpoint:
    kimg: float
    path: Path


def path_for(run: Run, kimg: float) -> Path:
    """Where the snapshot at `kimg` lives: checkpoints/snapshot-000012.800kimg.pt."""
    return run.checkpoints_dir() / f"snapshot-{kimg_tag(kimg)}.pt"


def list_checkpoints(run: Run) -> list[Checkpoint]:
    """The run's snapshots, oldest first."""
    folder = run.checkpoints_dir()
    found = []
    for p in folder.glob("snapshot-*kimg.pt") if folder.is_dir() else ():
        m = _SNAPSHOT.match(p.name)
        if m:
            found.append(Checkpoint(float(m.group(1)), p))
    return sorted(found, key=lambda c: c.kimg)


def kept_network(run: Run) -> Checkpoint | None:
    """The run's kept network (RUN/network-<kimg>kimg.pt), or None."""
    found = [Checkpoint(float(m.group(1)), p) for p in run.path.glob("network-*kimg.pt")
             if (m := _NETWORK.match(p.name)) and p.is_file()]
    return max(found, key=lambda c: c.kimg) if found else None


def weights(run: Run) -> list[Checkpoint]:
    """Everything `eval` and `sample` can load, oldest first: the snapshots and the kept network (where no snapshot
    has its kimg)."""
    found = list_checkpoints(run)
    kept = kept_network(run)
    if kept is not None and not any(abs(c.kimg - kept.kimg) < 5e-4 for c in found):
        found = sorted([*found, kept], key=lambda c: c.kimg)
    return found


def save_network(run: Run, state: dict[str, Any]) -> Path:
    """Write the kept network (atomically) and remove an older one (a run trained further keeps its last)."""
    path = run.path / f"network-{kimg_tag(float(state['kimg']))}.pt"
    buffer = io.BytesIO()
    torch.save({"format": NETWORK_FORMAT, **state}, buffer)
    write_atomic(path, buffer.getvalue())
    for old in run.path.glob("network-*kimg.pt"):
        if old != path and _NETWORK.match(old.name):
            old.unlink(missing_ok=True)
    return path


class CheckpointError(UserError):
    """No readable checkpoint where one was asked for, or one that does not fit the run."""


@dataclass(frozen=True)
class Expected:
    """What a snapshot of a run must fit: the run's config and the tensor shapes of the network it builds."""

    config: Config
    shapes: dict[str, tuple[int, ...]]
    param_shapes: tuple[tuple[int, ...], ...] | None = None  # the optimizer's parameters in order (None: unchecked)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


# Fields that say where and how a run executes, not what its weights mean: a snapshot stays valid when they change
# (the dataset moved, another device, compiled or not, another number of processes).
PORTABLE = frozenset({"data.root", "data.gpu_resident", "train.device", "train.compile", "train.precision",
                      "train.cuda_graphs", "train.channels_last"})


STREAM_NAMES = ("flips", "timesteps", "noise", "labels")  # trainer.STREAMS: the generator states under `rng`
GENERATOR_STATE_BYTES = {"cpu": 5056, "cuda": CUDA_STATE_BYTES}  # a torch.Generator's get_state() size


def _count(value: Any, integer: bool = False) -> bool:
    """A finite number >= 0 (an int with `integer`; bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
        return False
    return math.isfinite(value) and value >= 0


def _byte_state(value: Any, size: int | None = None) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and (size is None or value.numel() == size))


def field_problems(state: dict[str, Any], expected: Expected | None = None) -> list[str]:
    """What is wrong with the fields of a snapshot beyond its weights and config, each naming the field: the counts
    (kimg, nimg, step, train_s, world_size), and in a resumable snapshot the data position, the optimizer state
    (groups, parameter indices, moment shapes against `expected.param_shapes`) and the random states (their sizes
    for the device that wrote them). Empty when every field the loaders use fits."""
    found = [f"{key}: {str(state[key])[:24]!r} is not a number >= 0" for key, integer in
             (("kimg", False), ("nimg", True), ("step", True), ("train_s", False)) if not _count(state[key], integer)]
    if "world_size" in state and not (_count(state["world_size"], True) and state["world_size"] >= 1):
        found.append(f"world_size: {str(state['world_size'])[:24]!r} is not a whole number >= 1")
    if state.get("format") == NETWORK_FORMAT:
        return found
    data = state["data"]
    if not (isinstance(data, dict) and all(_count(data.get(key), True) for key in ("epoch", "position"))):
        found.append("data: expected {epoch, position} (whole numbers >= 0)")
    found += _optimizer_problems(state["optimizer"], expected.param_shapes if expected is not None else None)
    found += _rng_problems(state["rng"], state.get("world_size", 1))
    return found


def _optimizer_problems(optimizer: Any, shapes: tuple[tuple[int, ...], ...] | None) -> list[str]:
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    moments = optimizer.get("state") if isinstance(optimizer, dict) else None
    if not (isinstance(groups, list) and groups and isinstance(moments, dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return ["optimizer: expected {state, param_groups: [{params, ...}]}"]
    params = [index for group in groups for index in group["params"]]
    if shapes is not None and sorted(params) != list(range(len(shapes))):
        return [f"optimizer: its groups hold {len(params)} parameters, the network has {len(shapes)}"]
    for index, entry in moments.items():
        known = shapes is None or (isinstance(index, int) and 0 <= index < len(shapes))
        if not isinstance(entry, dict) or not known:
            return [f"optimizer.state[{str(index)[:12]}]: not the state of one of the network's parameters"]
        for name, value in entry.items():
            if name != "step" and shapes is not None and isinstance(value, torch.Tensor) \
                    and tuple(value.shape) != shapes[index]:
                return [f"optimizer.state[{index}].{name}: {list(value.shape)}, the parameter is {list(shapes[index])}"]
    return []


def _rng_problems(rng: Any, world_size: Any) -> list[str]:
    if not isinstance(rng, dict):
        return ["rng: not a mapping of generator states"]
    if not all(name in rng for name in STREAM_NAMES):  # immiscible 0.1 kept one stream: the trainer says so
        return []
    device = rng.get("device", "cuda" if _byte_state(rng["noise"], CUDA_STATE_BYTES) else "cpu")
    if device not in GENERATOR_STATE_BYTES:
        return [f"rng.device: {str(device)[:16]!r}, expected cpu or cuda"]
    found = [f"rng.{name}: not a {device} generator state ({GENERATOR_STATE_BYTES[device]} bytes)"
             for name in STREAM_NAMES if not _byte_state(rng[name], GENERATOR_STATE_BYTES[device])]
    if not _byte_state(rng.get("torch"), GENERATOR_STATE_BYTES["cpu"]):
        found.append("rng.torch: not a CPU generator state")
    for key in ("cuda", "cuda_ranks", "torch_ranks"):
        value = rng.get(key, [])
        if not (isinstance(value, list) and all(_byte_state(v) for v in value)):
            found.append(f"rng.{key}: not a list of generator states")
        elif key == "torch_ranks" and "torch_ranks" in rng and isinstance(world_size, int) and len(value) != world_size:
            found.append(f"rng.torch_ranks: {len(value)} states for {world_size} processes")
    return found


def mismatches(state: dict[str, Any], expected: Expected) -> list[str]:
    """How a snapshot's state differs from what the run expects, most telling first (empty when it fits).

    Config fields are compared where both sides have them (a field added to the schema later has its default in
    config.yaml and none in an older snapshot); resumable fields may differ."""
    network = state.get("format") == NETWORK_FORMAT
    missing = [key for key in (NETWORK_REQUIRED if network else REQUIRED) if key not in state]
    if missing:
        return [f"keys missing: {', '.join(missing)}"]
    found = field_problems(state, expected)
    found += [] if isinstance(state["config"], dict) else ["its config is not a mapping"]
    if state["config_digest"] != expected.config.digest() and not found:
        stored, current = _flat(state["config"]), _flat(expected.config.to_dict())
        for key in sorted(stored.keys() & current.keys()):
            if stored[key] != current[key] and not resumable(key.rstrip(".")) and key.rstrip(".") not in PORTABLE:
                found.append(f"{key.rstrip('.')}: {stored[key]!r} in the snapshot, {current[key]!r} in config.yaml")
    for part in ("ema",) if network else ("net", "ema"):
        tensors = state[part] if isinstance(state[part], dict) else {}
        absent = [name for name in expected.shapes if name not in tensors]
        extra = [name for name in tensors if name not in expected.shapes]
        if absent:
            found.append(f"{part}: {len(absent)} tensors missing ({', '.join(absent[:2])}, ...)")
        if extra:
            found.append(f"{part}: {len(extra)} unexpected tensors ({', '.join(extra[:2])}, ...)")
        for name, shape in expected.shapes.items():
            tensor = tensors.get(name)
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape):
                got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                found.append(f"{part}.{name}: {got} in the snapshot, {list(shape)} for config.yaml")
    return found


def save(path: Path, state: dict[str, Any]) -> None:
    """Serialise to memory first, then write atomically: a crash leaves the previous file, never half of this one."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    write_atomic(path, buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu", expected: Expected | None = None) -> dict[str, Any]:
    """Read one snapshot (weights_only=True); CheckpointError when it is truncated, corrupt or not ours, or (given
    `expected`) does not fit the run: the first three differences, in one line. A symlink leaving the folder that
    holds it, a FIFO or anything but a regular file is refused unopened (files.own_file_problem)."""
    problem = own_file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: not used as a checkpoint: {problem}; replace it with a snapshot file or "
                              f"remove it")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        reason = " ".join(str(e).split())[:120]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, NETWORK_FORMAT):
        raise CheckpointError(f"{path}: not an immiscible snapshot")
    problems = mismatches(state, expected) if expected is not None else []
    if problems:
        more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"{path}: does not fit this run ({'; '.join(problems[:3])}{more})")
    return state


def usable(run: Run, expected: Expected, exclude: Path | None = None) -> list[Checkpoint]:
    """The run's snapshots that load and fit `expected`, oldest first (each is read: meant for error messages)."""
    found = []
    for ckpt in weights(run):
        if ckpt.path != exclude:
            try:
                load(ckpt.path, "cpu", expected)
            except CheckpointError:
                continue
            found.append(ckpt)
    return found


def remove_leftovers(run: Run) -> list[Path]:
    """Delete the temporary files of atomic writes that were killed (.<file>.tmp-PID: snapshots, the kept network,
    config.yaml, meta.json, rewritten logs, sample grids) in the run, checkpoints/ and samples/. Call it only while
    holding the run's train lock: then nothing of the run is being written. Symlinks are left alone."""
    removed = []
    for folder in (run.path, run.checkpoints_dir(), run.path / "samples"):
        for path in folder.iterdir() if folder.is_dir() and not folder.is_symlink() else ():
            if _LEFTOVER.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return sorted(removed)


@dataclass
class Loaded:
    checkpoint: Checkpoint
    state: dict[str, Any]
    skipped: list[str]  # one message per newer checkpoint that could not be read


def load_newest(run: Run, map_location: str | torch.device = "cpu",
                expected: Expected | None = None) -> Loaded | None:
    """The newest readable snapshot of a run that fits `expected` (None when it has none); newer ones that are
    unreadable or do not fit are reported."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run)):
        try:
            return Loaded(ckpt, load(ckpt.path, map_location, expected), skipped)
        except CheckpointError as e:
            skipped.append(str(e))
    if skipped:
        raise CheckpointError(f"{run.path}: no usable checkpoint ({len(skipped)} skipped; the newest: {skipped[0]}); "
                              f"restore config.yaml if it was edited after training, or start a new run")
    return None


def parse_spec(spec: str) -> float | None:
    """`--ckpt`: `latest` -> None, a kimg -> float; CheckpointError for anything else (text, nan, inf, < 0)."""
    try:
        kimg = None if spec == "latest" else float(spec)
    except ValueError:
        kimg = math.nan
    if kimg is not None and not (math.isfinite(kimg) and kimg >= 0):
        raise CheckpointError(f"--ckpt {spec}: expected `latest` or a kimg number >= 0 (e.g. --ckpt 2000)")
    return kimg


def select(run: Run, spec: str) -> Checkpoint:
    """`latest` or a kimg (the snapshot nearest to it, within 0.5 kimg) -> a checkpoint of the run."""
    kimg = parse_spec(spec)  # a bad spec is reported before anything about the run
    available = weights(run)
    if not available:
        raise CheckpointError(f"{run.path}: no checkpoints yet (train it first, or wait for its first snapshot)")
    if kimg is None:
        return available[-1]
    nearest = min(available, key=lambda c: abs(c.kimg - kimg))
    if abs(nearest.kimg - kimg) > 0.5:
        listed = ", ".join(f"{c.kimg:g}" for c in available)
        raise CheckpointError(f"--ckpt {spec}: {run.path} has no snapshot at {spec} kimg (available: {listed})")
    return nearest


def prune(run: Run, keep_last: int, keep_every_kimg: float, batch_size: int = 1) -> list[Path]:
    """Delete snapshots beyond the newest `keep_last`, except those of the step that reached or crossed a multiple
    of keep_every_kimg (with batch_size images per step, snapshots fall on the first step past a multiple)."""
    removed = []
    available = list_checkpoints(run)
    every = round(keep_every_kimg * 1000)
    for ckpt in available[:-keep_last] if keep_last < len(available) else []:
        nimg = round(ckpt.kimg * 1000)
        if every > 0 and nimg // every > (nimg - batch_size) // every:
            continue
        ckpt.path.unlink(missing_ok=True)
        removed.append(ckpt.path)
    return removed


@dataclass
class Resumed:
    checkpoint: Checkpoint
    skipped: list[str]  # newer checkpoints that could not be read
    dropped_rows: int  # metrics/FID rows written after the checkpoint, removed so the resumed run writes them again


def resume(run: Run, load_state: Callable[[dict[str, Any]], None],
           map_location: str | torch.device = "cpu", expected: Expected | None = None) -> Resumed | None:
    """Hand the newest readable snapshot that fits `expected` to `load_state` and cut the run's logs back to its
    kimg; None when the run has no snapshot yet (a fresh start). One path for one process or several (one process
    is the case W = 1): rank 0 reads the snapshot (to `map_location`; with several processes to the CPU, to send it
    to every rank, so the run directory need not be shared), every rank hands it to `load_state` (the same snapshot
    everywhere: an error there is the same on every rank), rank 0 cuts the logs back."""
    where = map_location if distributed.world() == 1 else "cpu"
    loaded = distributed.on_main(lambda: load_newest(run, where, expected))
    if loaded is None:
        return None
    try:
        load_state(loaded.state)
    except UserError as e:
        raise distributed.everywhere(e)
    dropped = distributed.on_main(lambda: run.truncate_after(float(loaded.state["nimg"]) / 1000))
    return Resumed(loaded.checkpoint, loaded.skipped, dropped)


# ------------------------------------------------------------------------------------------------------------------
# moving between devices

OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")
"""Optimizer group settings that say how the update runs on this device, not what it computes."""


def rng_device(rng: dict[str, Any]) -> str:
    """The device type ("cpu" or "cuda") whose generators wrote a snapshot's stream states: `rng["device"]`, or, in
    snapshots written before it was stored, read off the size of the `noise` state."""
    if "device" in rng:
        return str(rng["device"])
    return "cuda" if rng["noise"].numel() == CUDA_STATE_BYTES else "cpu"


def cuda_states_to_restore(states: list[torch.Tensor], device_count: int) -> tuple[list[tuple[int, torch.Tensor]],
                                                                                  str | None]:
    """The per-GPU dropout states a process seeing `device_count` GPUs can restore, as (GPU index, CPU byte tensor),
    and a note when the snapshot has states of GPUs this machine lacks (they are left out)."""
    kept = [(index, state.cpu()) for index, state in enumerate(states[:device_count])]
    if len(states) <= device_count:
        return kept, None
    return kept, (f"the snapshot holds the random states of {len(states)} GPUs, this machine has {device_count}: "
                  f"restored the first {device_count}, left out the others")


def restore_random_streams(rng: dict[str, Any], generators: dict[str, torch.Generator], device: torch.device,
                           reseed: Callable[[str], int]) -> list[str]:
    """Set the training streams (`generators`, on `device`) and torch's CPU and CUDA states from a snapshot's `rng`;
    the notes for log.txt (empty when everything was restored).

    Same device type: every state is restored, the CUDA ones only for the GPUs this machine has. Another device
    type: a CUDA generator's state cannot be set on a CPU generator nor the reverse, so every stream is reseeded
    with `reseed(name)` (the caller derives it from the run seed and the step: a resumed run stays deterministic,
    not bit-exact) and the CUDA states are not used; the caller reseeds dropout too.
    """
    saved = rng_device(rng)
    if saved != device.type:
        for name, generator in generators.items():
            generator.manual_seed(reseed(name))
        return [f"resumed on {device.type} from a snapshot made on {saved}: random streams reseeded from the run "
                f"seed and the step (deterministic, not bit-exact)"]
    for name, generator in generators.items():
        generator.set_state(rng[name].cpu())
    torch.set_rng_state(rng["torch"].cpu())
    if device.type != "cuda" or not rng.get("cuda"):
        return []
    kept, note = cuda_states_to_restore(list(rng["cuda"]), torch.cuda.device_count())
    for index, state in kept:
        torch.cuda.set_rng_state(state, index)
    return [note] if note else []


def portable_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimizer state_dict with the implementation flags (OPTIMIZER_FLAGS) of `optimizer`'s groups in
    place of the saved ones: a CUDA run's fused Adam resumes in the CPU's foreach Adam and the reverse.
    Optimizer.load_state_dict then moves the moments to the parameters' device and places `step` as the current
    flags need it (on the device as float32 when fused, else as saved)."""
    groups = [{**group, **{flag: current[flag] for flag in OPTIMIZER_FLAGS if flag in current}}
              for group, current in zip(saved["param_groups"], optimizer.param_groups)]
    groups += saved["param_groups"][len(groups):]  # a mismatch is for load_state_dict to report
    return {**saved, "param_groups": groups}
