"""The configuration schema: the whole config (`Config`), its sections and the rules across them. Every default
is on its field with a docstring that carries the unit, in the section modules: `sections.py` (data, model, train,
sample, eval), `methods.py` (the objective and the pairing rule, with the names users choose among: `SAMPLERS`,
`OBJECTIVE_SECTIONS`, `ASSIGNER_SECTIONS`), `fields.py` (the base model, bounds, kimg types). Nothing here reads
files: loading, presets and `--set` live in `loading.py`, error messages in `validation.py`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from pydantic import Field, model_validator

from .fields import _Section
from .methods import SAMPLERS, Assigner, DDPMObjective, Objective, VanillaAssigner
from .sections import DataConfig, EvalConfig, ModelConfig, SampleConfig, TrainConfig

DEFAULT_PRESET = "quickstart"


class Config(_Section):
    name: str = Field(DEFAULT_PRESET, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name; the run directory is named NNNNN-name."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed of every random draw in training (data order, flips, noise, timesteps, dropout, initialisation);
    0 to 2^32 - 1."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: Objective = Field(default_factory=DDPMObjective)
    assigner: Assigner = Field(default_factory=VanillaAssigner)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _resolve(self) -> "Config":
        allowed = SAMPLERS[self.objective.kind]
        if self.sample.sampler is None:
            self.sample.sampler = allowed[0]
        if self.eval.sampler is None:
            self.eval.sampler = self.sample.sampler
        for path, value in (("sample.sampler", self.sample.sampler), ("eval.sampler", self.eval.sampler)):
            if value not in allowed:
                raise ValueError(f"{path}: '{value}' does not go with objective.kind '{self.objective.kind}' "
                                 f"(accepted: {', '.join(allowed)})")
        _check_data(self)
        levels = len(self.model.channel_mult) - 1
        if self.data.resolution % (2 ** levels):
            raise ValueError(f"data.resolution: {self.data.resolution} is not divisible by 2^{levels} "
                             f"(model.channel_mult has {levels + 1} levels); use a multiple of {2 ** levels}")
        m = self.model  # attention at the attn_resolutions sides and always in the middle block (models/unet.py)
        widths = {m.channels * mult for level, mult in enumerate(m.channel_mult)
                  if self.data.resolution // 2 ** level in m.attn_resolutions} | {m.channels * m.channel_mult[-1]}
        bad = sorted(w for w in widths if w >= m.head_channels and w % m.head_channels)
        if bad:
            raise ValueError(f"model.head_channels: {m.head_channels} does not divide the {bad[0]} channels of an "
                             f"attention level (model.channels x channel_mult); use a divisor of {bad[0]}")
        if self.objective.kind == "ddpm":  # the samplers visit distinct timesteps (objectives/ddpm.py)
            for path, steps in (("sample.steps", self.sample.steps), ("eval.steps", self.eval.steps)):
                if steps > self.objective.timesteps:
                    raise ValueError(f"{path}: {steps} is more than objective.timesteps "
                                     f"({self.objective.timesteps}); use at most that many steps")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the config (short form: first 16 hex digits)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_data(cfg: Config) -> None:
    """The data rules across sections: images have 1 or 3 channels; latents are not flipped, and a DDPM sampler
    must not clip them to the image range [-1, 1] (they are not bounded by it)."""
    data = cfg.data
    if data.source != "latents":
        if data.channels not in (1, 3):
            raise ValueError(f"data.channels: {data.channels}; images have 1 (grey) or 3 (RGB) channels (other "
                             f"counts are for data.source=latents)")
        if data.vae is not None:
            raise ValueError("data.vae: a VAE decodes latents; this run trains on images (data.source="
                             f"{data.source}), drop data.vae")
        return
    if data.hflip:
        raise ValueError("data.hflip: flipping a latent only approximates flipping its image; set "
                         "data.hflip=false for data.source=latents")
    if cfg.objective.kind == "ddpm" and cfg.sample.clip_x0:
        raise ValueError("sample.clip_x0: latents are not bounded by [-1, 1], so x0 must not be clipped to it; "
                         "set sample.clip_x0=false for data.source=latents")
