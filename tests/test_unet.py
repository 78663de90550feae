"""The bundled UNet: shapes, the pinned CIFAR-10 size, zero-init, gradients, batch independence, conditioning."""

from __future__ import annotations

import pytest
import torch

from immiscible_cli.config import ModelConfig
from immiscible_cli.models.unet import UNet, group_norm

# Our architecture at the CIFAR-10 configuration (ModelConfig defaults, 3 channels, 32x32). It equals the
# torchcfm/ADM UNet of the official code (4 heads x 64 channels at 16x16): 35,746,307 parameters.
CIFAR10_PARAMETERS = 35_746_307


def tiny_config(num_classes: int | None = None) -> ModelConfig:
    """Two levels (16x16, 8x8), one res block, attention at 8x8 with 2 heads of 8 channels."""
    return ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], head_channels=8,
                       dropout=0.0, num_classes=num_classes)


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, so zero-initialised layers stop hiding the rest of the net."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return net


def inputs(batch: int, channels: int = 3, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images x [B, C, side, side] and net times t [B] in [0, 999)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, side, side, generator=generator)  # [B, C, H, W]
    t = torch.rand(batch, generator=generator) * 999  # [B]
    return x, t


@pytest.mark.parametrize("num_classes", [None, 10])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape(num_classes: int | None, channels: int) -> None:
    net = UNet(tiny_config(num_classes), image_channels=channels, resolution=16)
    x, t = inputs(2, channels)
    labels = None if num_classes is None else torch.tensor([0, 9])
    out = net(x, t, labels)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_cifar10_parameter_count() -> None:
    net = UNet(ModelConfig(), image_channels=3, resolution=32)
    count = sum(p.numel() for p in net.parameters())
    assert count == CIFAR10_PARAMETERS
    assert 35.5e6 <= count <= 36.0e6
    heads = [m.heads for m in net.modules() if hasattr(m, "heads")]
    assert heads and all(h == 4 for h in heads)  # 256 channels / 64 per head at 16x16 and in the middle


def test_group_norm_groups() -> None:
    assert group_norm(128).num_groups == 32
    assert group_norm(384).num_groups == 32
    assert group_norm(16).num_groups == 4  # at least 4 channels per group
    assert group_norm(48).num_groups == 8


def test_output_is_zero_at_init() -> None:
    net = UNet(tiny_config(5), image_channels=3, resolution=16)
    x, t = inputs(3)
    assert torch.equal(net(x, t, torch.tensor([0, 1, 5])), torch.zeros_like(x))


def test_gradients_flow() -> None:
    net = UNet(tiny_config(), image_channels=3, resolution=16)
    x, t = inputs(2)
    (net(x, t) - x).square().mean().backward()
    assert net.out[-1].weight.grad.abs().sum() > 0  # at init only the zeroed output conv can learn: it does

    perturbed(net).zero_grad()
    (net(x, t) - x).square().mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_batch_independence_in_eval_mode() -> None:
    net = perturbed(UNet(tiny_config(4), image_channels=3, resolution=16)).eval()
    x, t = inputs(4)
    labels = torch.tensor([0, 3, 4, 1])
    with torch.no_grad():
        together = net(x, t, labels)
        for i in range(4):
            alone = net(x[i:i + 1], t[i:i + 1], labels[i:i + 1])
            torch.testing.assert_close(alone, together[i:i + 1], atol=1e-5, rtol=1e-5)


def test_labels_change_the_output() -> None:
    net = perturbed(UNet(tiny_config(3), image_channels=3, resolution=16)).eval()
    x, t = inputs(1)
    with torch.no_grad():
        outs = [net(x, t, torch.tensor([label])) for label in range(4)]  # 3 = the null label
        unlabelled = net(x, t, None)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (outs[i] - outs[j]).abs().max() > 1e-4
    torch.testing.assert_close(unlabelled, outs[3], atol=0.0, rtol=0.0)  # None means the null token


def test_unconditional_net_refuses_labels() -> None:
    net = UNet(tiny_config(), image_channels=3, resolution=16)
    x, t = inputs(1)
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, torch.tensor([0]))


def test_channels_last_gives_the_same_output() -> None:
    net = perturbed(UNet(tiny_config(), image_channels=3, resolution=16)).eval()
    x, t = inputs(2)
    with torch.no_grad():
        reference = net(x, t)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        UNet(tiny_config(), image_channels=3, resolution=15)
    with pytest.raises(ValueError, match="head_channels"):
        UNet(ModelConfig(channels=40, channel_mult=[1], num_res_blocks=1, attn_resolutions=[8], head_channels=16),
             image_channels=3, resolution=8)
