"""Snapshots moving between devices: a run trained on CUDA resumes on a CPU and the reverse, and on a machine with
fewer GPUs. Weights and optimizer moments are mapped to the new device (`portable_optimizer_state`); random streams
are restored exactly on the same device type and reseeded (deterministically, from the run seed and the step) on
another, with a note for log.txt (`restore_random_streams`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .checkpoint_format import CUDA_STATE_BYTES

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
