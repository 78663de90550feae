"""Training objectives: one per file (ddpm.py, flow.py), a registry keyed by the config's `objective.kind`.

Every objective offers the interface of protocol.py (`Objective`): training times, the loss, the samplers with
their editing hook, and what the rest of the package asks of an objective without naming it: noising at a level
(editing), the time and coefficients of a noise level (analysis), the sampler fields of an FID row (metrics).
"""

from __future__ import annotations

from typing import Any

from immiscible_cli.config import Objective as ObjectiveConfig, SampleConfig
from immiscible_cli.objectives.ddpm import DDPM
from immiscible_cli.objectives.flow import Flow
from immiscible_cli.objectives.protocol import Coefficients, Objective

OBJECTIVES: dict[str, type[Objective]] = {"ddpm": DDPM, "flow": Flow}

SAMPLER_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(field for objective in OBJECTIVES.values()
                                                      for field in objective.sampler_fields))
"""Every objective's sampler fields in registry order: the keys of an FID row's `sampling` besides noise/start."""


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """The objective for a validated `objective` config section, picked by its `kind`."""
    return OBJECTIVES[cfg.kind](cfg)


def sampler_settings(kind: str, sample: SampleConfig, sampler: str) -> dict[str, Any]:
    """The values of every objective's sampler fields (SAMPLER_FIELDS, in that order) for `sampler` of the
    objective `kind`: those it uses, None for the others (so changing, say, eta does not split a flow curve)."""
    used = OBJECTIVES[kind].sampler_settings(sample, sampler)
    return {field: used.get(field) for field in SAMPLER_FIELDS}


__all__ = ["Coefficients", "DDPM", "Flow", "OBJECTIVES", "Objective", "SAMPLER_FIELDS", "build_objective",
           "sampler_settings"]
