"""The bundled UNet: a self-contained DDPM/ADM-style denoiser, and classifier-free guidance around it.

Architecture (Ho et al. 2020, as refined by Dhariwal & Nichol 2021 "ADM"; the torchcfm CIFAR-10 UNet of the official
immiscible code is this network): a sinusoidal time embedding through a 2-layer MLP; residual blocks (GroupNorm, SiLU,
3x3 conv, + time embedding, GroupNorm, SiLU, dropout, 3x3 conv) with multi-head self-attention at chosen feature
sides; strided-conv downsampling, nearest + conv upsampling, one skip per encoder block. The last conv of every
residual branch and of the output is zero-initialised, so every block starts as the identity and the net as zero.

Class conditioning adds a learned embedding to the time embedding. The table has `num_classes + 1` rows: row
`num_classes` is the "no label" token, used for label dropout in training and for classifier-free guidance.

Every op is per-sample (GroupNorm, attention within an image), so image i's output never depends on the rest of the
batch. The forward has no data-dependent control flow and no host synchronisation (torch.compile / CUDA graphs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from immiscible_cli.config import ModelConfig


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a bf16 input in bf16 under autocast (same parameters, same state_dict keys).

    Autocast runs group_norm in fp32, so every norm of a bf16 network would cast its input up and its output back
    down (at the next conv): two extra passes over the activation. Its kernels (CUDA and CPU) take bf16 input and
    accumulate the mean and variance in fp32 whatever the input dtype, so only the output is rounded to bf16, as
    the next conv would round it anyway: safe. The affine weights are cast to bf16 for the call; the parameters
    themselves stay fp32. Outside autocast, or for fp32/fp16 input, this is nn.GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def group_norm(channels: int) -> GroupNorm:
    """GroupNorm with 32 groups, or fewer so each group keeps at least 4 channels (tiny test models)."""
    groups = 32
    while groups > 1 and (channels % groups or channels // groups < 4):
        groups //= 2
    return GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: the residual branch (or the output) starts at zero, as in ADM."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of times t [B] (Vaswani et al. 2017): cos then sin of t / max_period^(i/half)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None, :]  # [B, half]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # [B, 2 * half]
    if dim % 2:  # odd widths get one zero column so the MLP input is exactly `dim` wide
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResBlock(nn.Module):
    """Residual block with an additive time(+class) embedding; a 1x1 conv on the skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # [B, C_out, H, W]
        h = h + self.emb_proj(emb).to(h.dtype)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of each image, with a residual connection.

    heads = channels // head_channels; a layer narrower than head_channels gets one head of all its channels.
    """

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        if channels >= head_channels and channels % head_channels:
            raise ValueError(f"model.head_channels: {channels} channels at an attention level are not a multiple "
                             f"of head_channels {head_channels}")
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, height * width)
        # One copy into [3, B, heads, H*W, head_channels]: q, k and v are then contiguous, as the fused sdpa
        # kernels (flash, memory-efficient) need; strided views would send them to the slow math kernel.
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(dim=0)  # each [B, heads, H*W, head_channels]
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, H*W, head_channels]
        h = h.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class ResAttnBlock(nn.Module):
    """One UNet block: a residual block, then self-attention when this feature side is in attn_resolutions."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float,
                 attention: bool, head_channels: int):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_channels, dropout)
        self.attn = SelfAttention(out_channels, head_channels) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class Downsample(nn.Module):
    """Halve the feature side with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the feature side: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Noise / velocity predictor: forward(x [B, C, H, W], t [B] float, labels [B] long | None) -> [B, C, H, W].

    `t` is the time value the objective chose for the net (see the objective's `net_time`). With num_classes set,
    labels None means "no label" (the null token, row num_classes); an unconditional net refuses labels.
    """

    def __init__(self, cfg: ModelConfig, image_channels: int, resolution: int):
        super().__init__()
        levels = len(cfg.channel_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1} "
                             f"(model.channel_mult has {levels} levels)")
        self.image_channels, self.resolution = image_channels, resolution
        self.num_classes = cfg.num_classes
        self.base_channels = cfg.channels
        emb_channels = 4 * cfg.channels  # ADM's width for the time embedding

        self.time_mlp = nn.Sequential(nn.Linear(cfg.channels, emb_channels), nn.SiLU(),
                                      nn.Linear(emb_channels, emb_channels))
        self.class_embed = (nn.Embedding(cfg.num_classes + 1, emb_channels) if cfg.num_classes is not None else None)

        def block(c_in: int, c_out: int, side: int) -> ResAttnBlock:
            return ResAttnBlock(c_in, c_out, emb_channels, cfg.dropout, side in cfg.attn_resolutions,
                                cfg.head_channels)

        # Encoder: every module's output is kept as a skip for the decoder.
        self.conv_in = nn.Conv2d(image_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, width, side = [cfg.channels], cfg.channels, resolution
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(width, cfg.channels * mult, side))
                width = cfg.channels * mult
                skip_channels.append(width)
            if level < levels - 1:
                self.down.append(Downsample(width))
                skip_channels.append(width)
                side //= 2

        # Middle: residual block, attention (always, as in ADM), residual block.
        self.mid_in = ResBlock(width, width, emb_channels, cfg.dropout)
        self.mid_attn = SelfAttention(width, cfg.head_channels)
        self.mid_out = ResBlock(width, width, emb_channels, cfg.dropout)

        # Decoder: num_res_blocks + 1 blocks per level, each eating one skip; upsample at the end of a level.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(width + skip_channels.pop(), cfg.channels * mult, side))
                width = cfg.channels * mult
            if level > 0:
                self.up.append(Upsample(width))
                side *= 2

        self.out = nn.Sequential(group_norm(width), nn.SiLU(),
                                 zero_init(nn.Conv2d(width, image_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predict [B, C, H, W] from x [B, C, H, W] at net times t [B] with class labels [B] (or None)."""
        # The sinusoids are computed in float32 (t reaches 999), then take the weights' dtype.
        sinusoids = timestep_embedding(t, self.base_channels).to(self.time_mlp[0].weight.dtype)
        emb = self.time_mlp(sinusoids)  # [B, 4 * channels]
        if self.class_embed is not None:
            if labels is None:  # unconditional use of a conditional net: the null token for every image
                labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(labels)
        elif labels is not None:
            raise ValueError("labels given to an unconditional UNet (model.num_classes is None)")

        h = self.conv_in(x)  # [B, channels, H, W]
        skips = [h]
        for module in self.down:
            h = module(h, emb)
            skips.append(h)
        h = self.mid_out(self.mid_attn(self.mid_in(h, emb)), emb)
        for module in self.up:
            if not isinstance(module, Upsample):  # a static (per-module) choice, unrolled by torch.compile
                h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb)
        return self.out(h).to(x.dtype)
