"""The configuration schema: one pydantic model per section, every default on its field with a docstring that
carries the unit. Nothing here reads files: loading, presets and `--set` live in `loading.py`, error messages in
`validation.py`.

The names users choose among are listed once: `SAMPLERS` (objective kind -> its samplers, the first is the
default), `OBJECTIVE_SECTIONS` and `ASSIGNER_SECTIONS` (tag -> section model); the `Literal` choices, the
discriminated unions and the registries in objectives/ and assigners/ follow from them (a test keeps them equal).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

DEFAULT_PRESET = "quickstart"
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddim", "ddpm"), "flow": ("euler", "heun", "dopri5")}
SamplerName = Literal[tuple(name for names in SAMPLERS.values() for name in names)]  # type: ignore[valid-type]


MAX_KIMG = 1e9
"""Upper bound of every kimg length or interval (10^12 images), so that kimg x 1000 is an exact integer count."""
# Upper bounds of counts and sizes, far above any real run, so an absurd value is one line naming the field instead
# of an allocator traceback or a run that never ends
MAX_BATCH = 65_536  # images in one batch (train, sample, eval), neighbours in the KNN assigner
MAX_WIDTH = 4_096  # channels of the UNet's first level, of an attention head
MAX_STEPS = 100_000  # diffusion timesteps, sampling steps
MAX_FID_IMAGES = 10_000_000  # generated or real images behind one FID point (50k is the usual)


def _off_or_one_image(value: float) -> float:
    """A kimg interval where 0 means off: anything else must be at least one image (it is rounded to images)."""
    if 0 < value < 0.001:
        raise ValueError("use 0 (off) or at least 0.001 kimg (one image)")
    return value


Kimg = Annotated[float, Field(ge=0.001, le=MAX_KIMG)]  # a length or interval of at least one image
OptionalKimg = Annotated[float, Field(ge=0.0, le=MAX_KIMG), AfterValidator(_off_or_one_image)]  # 0 = off
AdamBeta = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Section(BaseModel):
    """Every section forbids unknown fields and non-finite floats (inf, nan, 1e400): no field opts out."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------------------------
# data


class DataConfig(_Section):
    source: Literal["embedded", "fashion-mnist", "cifar10", "imagefolder", "latents"] = "embedded"
    """Dataset: `embedded` (10k Fashion-MNIST images shipped in the package), `fashion-mnist`, `cifar10`,
    `imagefolder` (any folder tree of images), or `latents` (a file written by `immiscible encode`: VAE latents,
    decoded by that VAE for grids, `sample` and FID)."""
    root: str | None = None
    """Dataset folder. cifar10: holds `cifar-10-batches-py/` or `cifar-10-python.tar.gz` (downloaded there when
    online). fashion-mnist: holds `FashionMNIST/raw/` (default: /usr/share/datasets/fashion-mnist). imagefolder:
    the folder to scan (required). latents: the `.safetensors` file `immiscible encode` wrote (required)."""
    vae: str | None = None
    """latents only: the VAE folder that decodes the samples; None = the folder recorded in the latents file. Its
    config.json and weights must be the ones the latents were encoded with (checked by sha256)."""
    split: Literal["train", "test"] = "train"
    """Which split to train on (imagefolder has only one)."""
    resolution: int = Field(32, ge=8, le=1024)
    """Side of the square training images, in pixels (for latents: the latents' side, image side / the VAE's
    downsampling factor)."""
    fit: Literal["pad", "resize"] = "pad"
    """How images of another size reach `resolution`: `pad` (zero-pad with the background value -1, then centre
    crop if larger) or `resize` (bicubic). imagefolder always centre-crops then resizes."""
    channels: int = Field(1, ge=1, le=64)
    """Channels the model sees: 1 or 3 for images (grey images are repeated to 3 when 3 is asked for); for
    latents, the VAE's latent channels (4 for Stable Diffusion's)."""
    hflip: bool = True
    """Random horizontal flip of each training image (on the fly, from the run's flips stream). Refused for
    latents: a flipped latent is only approximately the latent of the flipped image."""
    max_images: int | None = Field(None, ge=1)
    """Use only the first N images of the split (class-balanced order is not guaranteed); None = all, in images."""
    gpu_resident: bool = True
    """Keep the whole dataset on the GPU when it fits (uint8, under a quarter of free GPU memory)."""


# ----------------------------------------------------------------------------------------------------------------
# model


class ModelConfig(_Section):
    channels: int = Field(128, ge=8, le=MAX_WIDTH)
    """Base channel count of the UNet, in channels."""
    channel_mult: list[Annotated[int, Field(ge=1, le=64)]] = Field(default_factory=lambda: [1, 2, 2, 2], min_length=1,
                                                           max_length=16)
    """Channel multiplier per resolution level; len - 1 downsamplings."""
    num_res_blocks: int = Field(2, ge=1, le=64)
    """Residual blocks per resolution level."""
    attn_resolutions: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=lambda: [16])
    """Feature-map sides (in pixels) at which self-attention is applied."""
    head_channels: int = Field(64, ge=1, le=MAX_WIDTH)
    """Channels per attention head (heads = channels at that level / head_channels)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout probability inside residual blocks."""
    num_classes: int | None = Field(None, ge=1)
    """Class-conditional model with this many classes (None = unconditional)."""


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


# ----------------------------------------------------------------------------------------------------------------
# train / sample / eval


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    """Images per optimisation step (over all devices)."""
    batch_gpu: int | None = Field(None, ge=1, le=MAX_BATCH)
    """Images per forward/backward pass on each process; the gradients of batch_size / processes / batch_gpu
    passes are accumulated into one step (a divisor of that share). None = the whole share in one pass."""
    total_kimg: Kimg = 200_000.0
    """Training length, in thousands of images (at least 0.001, one image)."""
    lr: float = Field(2e-4, gt=0.0)
    """Peak learning rate."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """Optimiser."""
    betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.999)
    """Adam betas, each in [0, 1)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Weight decay (decoupled for adamw)."""
    warmup_kimg: float = Field(640.0, ge=0.0, le=MAX_KIMG)
    """Linear learning-rate warm-up, in thousands of images (640 kimg = 5k steps at batch 128)."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Gradient-norm clipping threshold; 0 = off."""
    ema_decay: float | None = Field(0.9999, ge=0.0, lt=1.0)
    """EMA decay per step (used when ema_halflife_kimg is None)."""
    ema_halflife_kimg: float | None = Field(None, gt=0.0, le=MAX_KIMG)
    """EMA half-life in thousands of images; when set it replaces ema_decay."""
    ema_warmup: bool = False
    """EMA warm-up as in tqch/ddpm-torch: the decay at step n is min(decay, (1 + n) / (10 + n)), so early
    averages are not dominated by the random initialisation."""
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of dropping the class label (classifier-free guidance); conditional models only."""
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["jsonl"])
    """Where tick rows, FID points and sample grids are logged. metrics.jsonl and fid.jsonl are always written,
    whatever the list says; `tensorboard` (RUN/tensorboard/) and `wandb` (RUN/wandb/, offline unless WANDB_MODE is
    set) are optional extras: `pip install 'immiscible[tensorboard]'` / `'immiscible[wandb]'`."""
    tick_kimg: Kimg = 10.0
    """Status line and metrics row every this many thousand images."""
    snapshot_kimg: Kimg = 1000.0
    """Checkpoint and sample grid every this many thousand images."""
    keep_last: int = Field(3, ge=1, le=1_000_000)
    """Checkpoints kept (newest first), besides the keep_every_kimg ones."""
    keep_every_kimg: OptionalKimg = 0.0
    """Also keep every checkpoint at a multiple of this many thousand images; 0 = none."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto = CUDA when available."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision: auto = bf16 on CUDA, fp32 on CPU."""
    compile: bool = False
    """torch.compile the training step's loss (network + objective, static shapes; first steps slower)."""
    cuda_graphs: bool = False
    """CUDA only: replay the compiled loss as CUDA graphs (torch.compile mode `reduce-overhead`; implies
    compile). Ignored on the CPU, with a note in log.txt, so a run moves between devices unchanged."""
    keep_network: bool = False
    """At the end of training also write RUN/network.pt: the final EMA weights and the training noise's moments
    alone (a few MB at small sizes), which `eval` and `sample` accept when the snapshots are gone (studies commit
    it, so a new sampling idea is a rescore, not a retrain)."""
    channels_last: bool = False
    """Keep the network's weights and inputs in channels_last memory format (faster convolutions on recent GPUs;
    the numbers stay the same up to summation order)."""

    @model_validator(mode="after")
    def _one_ema_rule(self) -> "TrainConfig":
        if self.ema_halflife_kimg is None and self.ema_decay is None:
            raise ValueError("set ema_decay or ema_halflife_kimg")
        return self


class SampleConfig(_Section):
    sampler: SamplerName | None = None
    """Sampler; None = the objective's default (ddim for ddpm, euler for flow)."""
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    """Sampling steps N (network evaluations per image for ddim/ddpm/euler, one more on the stride grid where N
    does not divide T; about twice that for heun; dopri5
    chooses its own steps)."""
    eta: float = Field(0.0, ge=0.0, le=1.0)
    """DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like)."""
    clip_x0: bool = True
    """DDIM/DDPM: clip the predicted x0 to [-c, c] at every step, c = assigner.image_scale (tqch/ddpm-torch clips
    to [-1, 1]; with image scaling the data live in [-c, c])."""
    ddim_grid: Literal["linspace", "stride"] = "linspace"
    """DDIM/DDPM timesteps for N steps: `linspace` = round(linspace(0, T - 1, N)) (starts at T - 1), `stride` =
    arange(0, T, T // N) as tqch/ddpm-torch (e.g. 980, 960, ..., 0 for N = 50)."""
    ode_atol: float = Field(1e-4, gt=0.0)
    """dopri5: absolute tolerance of the adaptive ODE solver (torchcfm's CIFAR-10 value)."""
    ode_rtol: float = Field(1e-4, gt=0.0)
    """dopri5: relative tolerance of the adaptive ODE solver (torchcfm's CIFAR-10 value)."""
    guidance: float = Field(1.0, ge=0.0)
    """Classifier-free guidance weight; 1.0 = none."""
    grid_size: int = Field(64, ge=1, le=4096)
    """Images in each snapshot grid."""
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    """Images generated per forward pass."""
    noise: Literal["per-image", "counter"] = "per-image"
    """Starting (and sampler) noise of seed i: `per-image` = one torch.Generator per image (every result so far),
    `counter` = one counter-based Philox draw per batch (faster for large batches on a GPU; other images). Either
    way image i depends on seed i alone; FID rows record it."""
    start_std: float = Field(1.0, gt=0.0, le=10.0)
    """Standard deviation of the starting noise x_T ~ N(0, start_std^2 I): 1.0 is the papers' (and every result's)
    choice. A diagnostic for assigners whose training noise is smaller than N(0, I)'s: KNN keeps the nearest of k
    draws, whose mean |n|^2 / D (`noise_sqnorm` in metrics.jsonl) is below 1; sqrt of it matches that norm. Early in
    training a start a little below 1 lowers every rule's FID (docs/results/fashion-mnist.md): compare rules at the
    same start_std. `immiscible eval --set sample.start_std=S` rescores a run without changing it."""
    start: Literal["standard", "matched"] = "standard"
    """Where sampling starts: `standard` x_T ~ N(0, I) (the papers'), or `matched` x_T ~ N(m, s^2 I) fitted to the
    noise the run trained with (m its mean image, s^2 = its mean |n|^2 / D - |m|^2 / D, accumulated in float64 over
    the whole run and kept in every snapshot). start_std multiplies the deviation from m. For rules whose noise is
    not N(0, I) (KNN's `l2` score): a fix at sampling time, no retraining."""


class EvalConfig(_Section):
    every_kimg: OptionalKimg = 0.0
    """FID every this many thousand images during training; 0 = off."""
    num_images: int = Field(10_000, ge=2, le=MAX_FID_IMAGES)
    """Generated images per FID point."""
    sampler: SamplerName | None = None
    """Sampler for FID images; None = sample.sampler."""
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    """Sampling steps for FID images."""
    mode: Literal["clean", "legacy_tensorflow"] = "clean"
    """clean-fid resize mode."""
    reference: Literal["computed", "cleanfid"] = "computed"
    """Reference statistics: computed from the dataset's real images, or clean-fid's published ones (CIFAR-10)."""
    reference_split: Literal["train", "test"] = "train"
    """Split of the real images behind the reference statistics."""
    reference_images: int | None = Field(None, ge=2, le=MAX_FID_IMAGES)
    """Real images behind computed statistics; None = the whole split."""
    batch_size: int = Field(250, ge=1, le=MAX_BATCH)
    """Images per batch through the generator and the Inception network."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The generator network's precision while sampling FID images (bf16: autocast, sampler state in float32;
    for GPUs). FID rows record it."""
    inception_precision: Literal["fp32", "fp16"] = "fp32"
    """The Inception network's precision on CUDA (fp16 features differ from fp32 by about 0.4% of their mean
    magnitude, so FIDs differ slightly: compare only rows of equal precision); the CPU always runs it in fp32.
    FID rows record the precision used."""


# ----------------------------------------------------------------------------------------------------------------
# the whole config


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
