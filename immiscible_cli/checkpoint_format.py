"""What a snapshot file holds and whether one fits the run (checkpoint.py reads and writes the files).

A snapshot is one `torch.save`d dict of tensors and plain values, so `torch.load(weights_only=True)` reads it:
    format, kimg, nimg, step, train_s, config (the resolved config as a dict), config_digest,
    net, ema (state_dicts), optimizer (state_dict),
    rng {"flips", "timesteps", "noise", "labels": generator states (train_state.STREAMS), "torch": CPU state
         (dropout), "cuda": [per-device states], "device": "cpu" | "cuda" (whose generators wrote the stream states;
         absent in older snapshots: read off their size), with several processes also "torch_ranks" and on CUDA
         "cuda_ranks": [each rank's dropout state]}, data {"epoch", "position"}, world_size (processes that trained
         it; absent: 1), noise_moments (start_noise.py; absent in older snapshots).
A kept network (train.keep_network) is the same dict without `net`, `optimizer`, `rng` and `data` (format
immiscible-network-v1: the EMA weights, the config, the noise moments).

Before a snapshot is used it is checked against the run (`Expected`, `mismatches`): the format tag, every key
above, the tensor names and shapes of both networks against the network config.yaml builds, the stored config
against config.yaml (fields a resumed run may change, config.RESUMABLE_OVERRIDES, and where it runs, PORTABLE,
excepted), and the counts, optimizer and random states (`field_problems`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config, resumable

FORMAT = "immiscible-snapshot-v1"
REQUIRED = ("kimg", "nimg", "step", "train_s", "config", "config_digest", "net", "ema", "optimizer", "rng", "data")
NETWORK_FORMAT = "immiscible-network-v1"
NETWORK_REQUIRED = ("kimg", "nimg", "step", "train_s", "config", "config_digest", "ema")
CUDA_STATE_BYTES = 16
"""Size of a CUDA (Philox) generator's state: seed and offset, 8 bytes each (a CPU generator's is 5056 bytes)."""


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


STREAM_NAMES = ("flips", "timesteps", "noise", "labels")  # train_state.STREAMS: the generator states under `rng`
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
