"""The config sections of what a run trains on and how it trains, samples and scores: `data`, `model`, `train`,
`sample` and `eval`, each field with its default and a docstring carrying its unit.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .fields import (MAX_BATCH, MAX_FID_IMAGES, MAX_KIMG, MAX_STEPS, MAX_WIDTH, AdamBeta, Kimg, OptionalKimg,
                     _Section)
from .methods import SamplerName


# ----------------------------------------------------------------------------------------------------------------
# data and model


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
