"""Configuration: the schema (`schema.py`: the whole config; its sections in `sections.py` and `methods.py`, what
they share in `fields.py`) apart from loading, presets and `--set` (`loading.py`) and validation with its one-line
errors (`validation.py`)."""

from .loading import (RESUMABLE_OVERRIDES, SAMPLING_OVERRIDES, changed_fields, check_sampler, check_steps,
                      list_presets, load_config, load_run_config, load_yaml, preset_dir, read_yaml, resolve_preset,
                      resumable, with_overrides)
from .methods import (ASSIGNER_NAMES, ASSIGNER_SECTIONS, OBJECTIVE_SECTIONS, SAMPLERS, Assigner, DDPMObjective,
                      FlowObjective, KNNAssigner, LinearAssigner, Objective, VanillaAssigner)
from .schema import DEFAULT_PRESET, Config
from .sections import DataConfig, EvalConfig, ModelConfig, SampleConfig, TrainConfig
from .validation import ConfigError, validate

__all__ = [
    "ASSIGNER_NAMES", "ASSIGNER_SECTIONS", "DEFAULT_PRESET", "OBJECTIVE_SECTIONS", "RESUMABLE_OVERRIDES", "SAMPLERS",
    "SAMPLING_OVERRIDES", "Assigner", "Config", "ConfigError", "DDPMObjective", "DataConfig", "EvalConfig",
    "FlowObjective", "KNNAssigner", "LinearAssigner", "ModelConfig", "Objective", "SampleConfig", "TrainConfig",
    "VanillaAssigner", "changed_fields", "check_sampler", "check_steps", "list_presets", "load_config",
    "load_run_config", "load_yaml", "preset_dir", "read_yaml", "resolve_preset", "resumable", "validate",
    "with_overrides",
]
