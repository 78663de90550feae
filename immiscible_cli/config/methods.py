"""The method's config sections: the objective (`objective.kind`) and the pairing rule (`assigner.name`), one
section model per choice.

The names users choose among are listed once: `SAMPLERS` (objective kind -> its samplers, the first is the
default), `OBJECTIVE_SECTIONS` and `ASSIGNER_SECTIONS` (tag -> section model); the `Literal` choices, the
discriminated unions and the registries in objectives/ and assigners/ follow from them (a test keeps them equal).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, model_validator

from .fields import MAX_BATCH, MAX_STEPS, _Section

SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddim", "ddpm"), "flow": ("euler", "heun", "dopri5")}
SamplerName = Literal[tuple(name for names in SAMPLERS.values() for name in names)]  # type: ignore[valid-type]


# ----------------------------------------------------------------------------------------------------------------
# objective


class DDPMObjective(_Section):
    kind: Literal["ddpm"] = "ddpm"
    timesteps: int = Field(1000, ge=2, le=MAX_STEPS)
    """Number of diffusion steps T."""
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    """beta_1 of the linear schedule."""
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    """beta_T of the linear schedule."""

    @model_validator(mode="after")
    def _increasing(self) -> "DDPMObjective":
        if self.beta_end <= self.beta_start:
            raise ValueError("beta_end must be larger than beta_start")
        return self


class FlowObjective(_Section):
    kind: Literal["flow"] = "flow"
    net_time_scale: float = Field(999.0, gt=0.0)
    """The network sees time t in [0, 1] as t * net_time_scale: 999 puts it on DDPM's timestep range (our
    default), 1.0 shows t itself, as torchcfm's CIFAR-10 code does (the `-fm` presets)."""


OBJECTIVE_SECTIONS: dict[str, type[BaseModel]] = {"ddpm": DDPMObjective, "flow": FlowObjective}
Objective = Annotated[Union[tuple(OBJECTIVE_SECTIONS.values())], Field(discriminator="kind")]  # type: ignore


# ----------------------------------------------------------------------------------------------------------------
# assigner


class _AssignerBase(_Section):
    image_scale: float = Field(1.0, gt=0.0)
    """Image scaling (improved paper): data multiplied by this before pairing, samples divided by it after
    generation. 1.0 = off."""

    @classmethod
    def label_settings(cls, section: dict[str, Any]) -> list[str]:
        """The settings that name this rule in compare's labels, read from a run's `assigner` section as written
        (a dict: older runs may lack fields), e.g. ['k=8'] for knn; image_scale is added by the caller."""
        return []


class VanillaAssigner(_AssignerBase):
    name: Literal["vanilla"] = "vanilla"


class LinearAssigner(_AssignerBase):
    name: Literal["linear"] = "linear"
    cost: Literal["l2", "sqeuclidean"] = "l2"
    """Image-noise cost: L2 distance (the papers' choice) or squared L2 (the optimal-transport choice)."""
    quantize: Literal["none", "fp16"] = "none"
    """`fp16` computes the cost matrix in fp16 after a pre-scale (the papers' quantized assignment)."""
    solver: Literal["scipy", "lapjv"] = "scipy"
    """Exact solver of the assignment: scipy's `linear_sum_assignment`, or LAPJV from the optional `lap` package
    (`pip install 'immiscible[lapjv]'`), faster at large batches; both give an optimal assignment."""
    scope: Literal["global", "local"] = "global"
    """With several processes (torchrun): `global` solves one assignment over the whole train.batch_size (the
    images are gathered to rank 0, as the official code does), `local` one per process over its share. One
    process: the same."""

    @classmethod
    def label_settings(cls, section: dict[str, Any]) -> list[str]:
        parts = [str(section.get("cost", "l2"))]
        if section.get("quantize", "none") != "none":
            parts.append(str(section["quantize"]))
        return parts


class KNNAssigner(_AssignerBase):
    name: Literal["knn"] = "knn"
    k: int = Field(8, ge=1, le=MAX_BATCH)
    """Candidates per image; the nearest in L2 is kept. k = 1 is vanilla."""
    memory_budget_mib: float = Field(1024.0, gt=0.0)
    """Most extra memory the candidate search may hold at once, in MiB (candidates are processed in chunks)."""
    knn_score: Literal["l2", "direction", "centred"] = "l2"
    """Which candidate is kept: `l2` the nearest in L2 (the papers' rule; its noise is shorter than N(0, I)'s and
    leans toward the data), `direction` the largest cosine to the image, `centred` the largest cosine to the image
    minus the training set's mean image (in model space, after image scaling). The last two choose by direction
    alone, so the kept norm is exactly Gaussian; `centred` also keeps the noise's mean near 0."""

    @classmethod
    def label_settings(cls, section: dict[str, Any]) -> list[str]:
        score = section.get("knn_score", "l2")
        return [f"k={section.get('k')}", *([str(score)] if score != "l2" else [])]


ASSIGNER_SECTIONS: dict[str, type[BaseModel]] = {"vanilla": VanillaAssigner, "linear": LinearAssigner,
                                                 "knn": KNNAssigner}
ASSIGNER_NAMES: tuple[str, ...] = tuple(ASSIGNER_SECTIONS)
Assigner = Annotated[Union[tuple(ASSIGNER_SECTIONS.values())], Field(discriminator="name")]  # type: ignore
