"""Configuration: the validated `Config` model, preset lookup, `--set` overrides and their error messages.

Every default lives here, on the pydantic field, with a docstring that carries its unit. A preset file holds only
the fields that differ from these defaults. `load_config` is the one entry point: preset name or path, plus
`--set section.field=value` overrides, to a validated `Config` or a `ConfigError` whose message names the file
and the field path.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError

DEFAULT_PRESET = "quickstart"
CACHE_ENV = "IMMISCIBLE_CACHE"


def cache_root() -> Path:
    """The user cache: $IMMISCIBLE_CACHE, else ~/.cache/immiscible. Downloads and FID statistics live here, never in
    site-packages (unlike clean-fid)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "immiscible").expanduser()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


# ----------------------------------------------------------------------------------------------------------------
# data


class DataConfig(_Section):
    source: Literal["embedded", "fashion-mnist", "cifar10", "imagefolder"] = "embedded"
    """Dataset: `embedded` (10k Fashion-MNIST images shipped in the package), `fashion-mnist`, `cifar10`, or
    `imagefolder` (any folder tree of images)."""
    root: str | None = None
    """Dataset folder. cifar10: holds `cifar-10-batches-py/` or `cifar-10-python.tar.gz` (downloaded there when
    online). fashion-mnist: holds `FashionMNIST/raw/` (default: /usr/share/datasets/fashion-mnist). imagefolder:
    the folder to scan (required)."""
    split: Literal["train", "test"] = "train"
    """Which split to train on (imagefolder has only one)."""
    resolution: int = Field(32, ge=8, le=1024)
    """Side of the square training images, in pixels."""
    fit: Literal["pad", "resize"] = "pad"
    """How images of another size reach `resolution`: `pad` (zero-pad with the background value -1, then centre
    crop if larger) or `resize` (bicubic). imagefolder always centre-crops then resizes."""
    channels: Literal[1, 3] = 1
    """Image channels the model sees; grey images are repeated to 3 when 3 is asked for."""
    hflip: bool = True
    """Random horizontal flip of each training image (on the fly, from the training generator)."""
    max_images: int | None = Field(None, ge=1)
    """Use only the first N images of the split (class-balanced order is not guaranteed); None = all, in images."""
    gpu_resident: bool = True
    """Keep the whole dataset on the GPU when it fits (uint8, under a quarter of free GPU memory)."""


# ----------------------------------------------------------------------------------------------------------------
# model


class ModelConfig(_Section):
    channels: int = Field(128, ge=8)
    """Base channel count of the UNet, in channels."""
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2, 2], min_length=1)
    """Channel multiplier per resolution level; len - 1 downsamplings."""
    num_res_blocks: int = Field(2, ge=1)
    """Residual blocks per resolution level."""
    attn_resolutions: list[int] = Field(default_factory=lambda: [16])
    """Feature-map sides (in pixels) at which self-attention is applied."""
    head_channels: int = Field(64, ge=1)
    """Channels per attention head (heads = channels at that level / head_channels)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout probability inside residual blocks."""
    num_classes: int | None = Field(None, ge=1)
    """Class-conditional model with this many classes (None = unconditional)."""


# ----------------------------------------------------------------------------------------------------------------
# objective


class DDPMObjective(_Section):
    kind: Literal["ddpm"] = "ddpm"
    timesteps: int = Field(1000, ge=2)
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


Objective = Annotated[Union[DDPMObjective, FlowObjective], Field(discriminator="kind")]
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddim", "ddpm"), "flow": ("euler", "heun")}


# ----------------------------------------------------------------------------------------------------------------
# assigner


class _AssignerBase(_Section):
    image_scale: float = Field(1.0, gt=0.0)
    """Image scaling (improved paper): data multiplied by this before pairing, samples divided by it after
    generation. 1.0 = off."""


class VanillaAssigner(_AssignerBase):
    name: Literal["vanilla"] = "vanilla"


class LinearAssigner(_AssignerBase):
    name: Literal["linear"] = "linear"
    cost: Literal["l2", "sqeuclidean"] = "l2"
    """Image-noise cost: L2 distance (the papers' choice) or squared L2 (the optimal-transport choice)."""
    quantize: Literal["none", "fp16"] = "none"
    """`fp16` computes the cost matrix in fp16 after a pre-scale (the papers' quantized assignment)."""


class KNNAssigner(_AssignerBase):
    name: Literal["knn"] = "knn"
    k: int = Field(8, ge=1)
    """Candidates per image; the nearest in L2 is kept. k = 1 is vanilla."""
    memory_budget_mib: float = Field(1024.0, gt=0.0)
    """Most extra memory the candidate search may hold at once, in MiB (candidates are processed in chunks)."""


Assigner = Annotated[Union[VanillaAssigner, LinearAssigner, KNNAssigner], Field(discriminator="name")]
ASSIGNER_NAMES: tuple[str, ...] = ("vanilla", "linear", "knn")


# ----------------------------------------------------------------------------------------------------------------
# train / sample / eval


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1)
    """Images per optimisation step (over all devices)."""
    total_kimg: float = Field(200_000.0, gt=0.0)
    """Training length, in thousands of images."""
    lr: float = Field(2e-4, gt=0.0)
    """Peak learning rate."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """Optimiser."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Weight decay (decoupled for adamw)."""
    warmup_kimg: float = Field(640.0, ge=0.0)
    """Linear learning-rate warm-up, in thousands of images (640 kimg = 5k steps at batch 128)."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Gradient-norm clipping threshold; 0 = off."""
    ema_decay: float | None = Field(0.9999, ge=0.0, lt=1.0)
    """EMA decay per step (used when ema_halflife_kimg is None)."""
    ema_halflife_kimg: float | None = Field(None, gt=0.0)
    """EMA half-life in thousands of images; when set it replaces ema_decay."""
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of dropping the class label (classifier-free guidance); conditional models only."""
    tick_kimg: float = Field(10.0, gt=0.0)
    """Status line and metrics row every this many thousand images."""
    snapshot_kimg: float = Field(1000.0, gt=0.0)
    """Checkpoint and sample grid every this many thousand images."""
    keep_last: int = Field(3, ge=1)
    """Checkpoints kept (newest first), besides the keep_every_kimg ones."""
    keep_every_kimg: float = Field(0.0, ge=0.0)
    """Also keep every checkpoint at a multiple of this many thousand images; 0 = none."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto = CUDA when available."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision: auto = bf16 on CUDA, fp32 on CPU."""
    compile: bool = False
    """torch.compile the model (CUDA; first steps slower)."""

    @model_validator(mode="after")
    def _one_ema_rule(self) -> "TrainConfig":
        if self.ema_halflife_kimg is None and self.ema_decay is None:
            raise ValueError("set ema_decay or ema_halflife_kimg")
        return self


class SampleConfig(_Section):
    sampler: Literal["ddim", "ddpm", "euler", "heun"] | None = None
    """Sampler; None = the objective's default (ddim for ddpm, euler for flow)."""
    steps: int = Field(50, ge=1)
    """Sampling steps (network evaluations per image for ddim/ddpm/euler; about twice that for heun)."""
    eta: float = Field(0.0, ge=0.0)
    """DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like)."""
    guidance: float = Field(1.0, ge=0.0)
    """Classifier-free guidance weight; 1.0 = none."""
    grid_size: int = Field(64, ge=1)
    """Images in each snapshot grid."""
    batch_size: int = Field(256, ge=1)
    """Images generated per forward pass."""


class EvalConfig(_Section):
    every_kimg: float = Field(0.0, ge=0.0)
    """FID every this many thousand images during training; 0 = off."""
    num_images: int = Field(10_000, ge=2)
    """Generated images per FID point."""
    sampler: Literal["ddim", "ddpm", "euler", "heun"] | None = None
    """Sampler for FID images; None = sample.sampler."""
    steps: int = Field(50, ge=1)
    """Sampling steps for FID images."""
    mode: Literal["clean", "legacy_tensorflow"] = "clean"
    """clean-fid resize mode."""
    reference: Literal["computed", "cleanfid"] = "computed"
    """Reference statistics: computed from the dataset's real images, or clean-fid's published ones (CIFAR-10)."""
    reference_split: Literal["train", "test"] = "train"
    """Split of the real images behind the reference statistics."""
    reference_images: int | None = Field(None, ge=2)
    """Real images behind computed statistics; None = the whole split."""
    batch_size: int = Field(250, ge=1)
    """Images per batch through the generator and the Inception network."""


# ----------------------------------------------------------------------------------------------------------------
# the whole config


class Config(_Section):
    name: str = Field(DEFAULT_PRESET, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name; the run directory is named NNNNN-name."""
    seed: int = Field(0, ge=0)
    """Seed of every random draw in training (data order, flips, noise, timesteps, dropout, initialisation)."""
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
        levels = len(self.model.channel_mult) - 1
        if self.data.resolution % (2 ** levels):
            raise ValueError(f"data.resolution: {self.data.resolution} is not divisible by 2^{levels} "
                             f"(model.channel_mult has {levels + 1} levels); use a multiple of {2 ** levels}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the config (short form: first 16 hex digits)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# loading


# Fields `immiscible train --resume RUN --set ...` may change: none of them alters the training math, so a run
# extended this way is the same run as one configured with the new values from the start.
RESUMABLE_OVERRIDES = ("train.total_kimg", "train.tick_kimg", "train.snapshot_kimg", "train.keep_last",
                       "train.keep_every_kimg", "sample.", "eval.")


class ConfigError(UserError):
    """A config problem, with a one-line message naming the file (or `--set`) and the field path."""


def preset_dir() -> Path:
    """The shipped presets: immiscible_cli/presets in an installed wheel, the top-level presets/ in a checkout."""
    package = Path(str(importlib.resources.files("immiscible_cli")))
    installed = package / "presets"
    return installed if installed.is_dir() else package.parent / "presets"


def list_presets() -> dict[str, str]:
    """name -> one-line description (the first header-comment line) of every shipped preset."""
    out = {}
    for path in sorted(preset_dir().glob("*.yaml"), key=lambda p: p.stem):
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "# ")
        out[path.stem] = first.lstrip("#").strip()
    return out


def resolve_preset(preset: str | None) -> Path:
    """A preset name (shipped) or a path to a YAML file."""
    name = preset or DEFAULT_PRESET
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") or "/" in name or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(f"{name}: no such preset file; give a YAML file or one of the names from "
                              f"`immiscible presets`")
        return candidate
    shipped = preset_dir() / f"{name}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"preset '{name}': unknown preset (accepted: {', '.join(list_presets())}, "
                          f"or a path to a .yaml file)")
    return shipped


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping of sections (data, model, ...), "
                          f"got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.field=value` (value parsed as YAML) to a raw config dict, in place."""
    if "=" not in override:
        raise ConfigError(f"--set {override}: expected section.field=value, e.g. train.lr=1e-4")
    path, text = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {override}: bad field path '{path}', expected section.field=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override}: '{'.'.join(keys[:i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


_UNION_MEMBERS: dict[str, type[BaseModel]] = {
    "ddpm": DDPMObjective, "flow": FlowObjective,
    "vanilla": VanillaAssigner, "linear": LinearAssigner, "knn": KNNAssigner,
}
_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig, "eval": EvalConfig,
}


def _accepted_fields(loc: tuple) -> list[str]:
    """Field names accepted where an unknown field was found (loc without its last part)."""
    parent = loc[:-1]
    if not parent:
        return list(Config.model_fields)
    if len(parent) >= 2 and parent[1] in _UNION_MEMBERS:
        return list(_UNION_MEMBERS[parent[1]].model_fields)
    section = _SECTIONS.get(parent[0])
    return list(section.model_fields) if section and len(parent) == 1 else []


def _field_path(loc: tuple) -> str:
    """pydantic's location as users write it: discriminated unions add the tag (assigner.knn.k), drop it."""
    parts = [str(p) for i, p in enumerate(loc)
             if not (i == 1 and loc[0] in ("objective", "assigner") and p in _UNION_MEMBERS)]
    return ".".join(parts)


def _format_error(err: dict[str, Any]) -> tuple[str, str]:
    """(field path, message) for one pydantic error."""
    loc = tuple(err["loc"])
    path, kind, msg = _field_path(loc), err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        accepted = _accepted_fields(loc)
        hint = f" (accepted here: {', '.join(accepted)})" if accepted else ""
        return path, f"unknown field '{path}'{hint}"
    if kind == "union_tag_invalid":
        tag = "kind" if path == "objective" else "name"
        choices = "ddpm, flow" if tag == "kind" else ", ".join(ASSIGNER_NAMES)
        return f"{path}.{tag}", f"{path}.{tag}: unknown choice {err['ctx']['tag']!r} (accepted: {choices})"
    if kind == "union_tag_not_found":
        tag = "kind" if path == "objective" else "name"
        return f"{path}.{tag}", f"{path}: missing '{tag}' field, which picks the variant"
    if not path:  # a cross-field rule of Config: its message starts with the field path already
        return msg.split(":", 1)[0], msg
    shown = err.get("input")
    got = "" if isinstance(shown, (dict, list)) or shown is None else f", got {shown!r}"
    return path, f"{path}: {msg}{got}"


def validate(raw: dict[str, Any], source: str | Callable[[str], str]) -> Config:
    """Validate a raw dict; on failure raise ConfigError, one line per problem, each naming its source."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path, message = _format_error(err)
            origin = source(path) if callable(source) else source
            lines.append(f"{origin}: {message}")
        raise ConfigError("\n".join(lines)) from None


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset (name or path; default quickstart) + `--set` overrides -> validated Config."""
    path = resolve_preset(preset)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    source = f"preset {path.stem} ({path})" if path.parent == preset_dir() else str(path)
    config = validate(raw, source)  # a broken file is reported as the file's problem, before any --set
    return with_overrides(config, overrides) if overrides else config


def with_overrides(config: Config, overrides: list[str] | tuple[str, ...],
                   allowed: tuple[str, ...] | None = None) -> Config:
    """A copy of config with `--set section.field=value` overrides applied and validated.

    `allowed`: field paths (or section prefixes ending in '.') that may be overridden; others are refused."""
    raw = config.to_dict()
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if allowed is not None and not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            raise ConfigError(f"--set {item}: '{key}' cannot change in a run that has started (changeable: "
                              f"{', '.join(a + '*' if a.endswith('.') else a for a in allowed)})")
        apply_override(raw, item)

    def blame(field: str) -> str:
        for item in reversed(overrides):
            key = item.split("=", 1)[0].strip()
            if field == key or field.startswith(key + ".") or key.startswith(field + "."):
                return f"--set {item}"
        return f"--set {' '.join(overrides)}"

    return validate(raw, blame)


def check_sampler(kind: str, sampler: str, option: str = "--sampler") -> None:
    """ConfigError unless `sampler` belongs to the objective `kind` (SAMPLERS)."""
    if sampler not in SAMPLERS[kind]:
        raise ConfigError(f"{option} {sampler}: this run trains a {kind} objective "
                          f"(accepted: {', '.join(SAMPLERS[kind])})")


def load_run_config(path: Path) -> Config:
    """The resolved config.yaml of a run directory."""
    return validate(read_yaml(path), str(path))
