"""The FID network: NVIDIA's Inception v3 trunk (inception-2015-12-05) as a plain module.

`InceptionTrunk` reproduces the TorchScript `layers` that clean-fid runs (same parameter names, so its state_dict
loads with strict=True; same ops, so the 2048-d pool features are bit-identical on the same device and layout).
Where its weights come from is `weights.py`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Module):
    """TF's conv layer: conv without bias -> batch norm with beta only (no scale), eps 1e-3 -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        # Buffers, not parameters: the network is never trained, and buffers follow .to(device) all the same.
        self.register_buffer("weight", torch.empty(cout, cin, kh, kw))
        self.register_buffer("beta", torch.empty(cout))
        self.register_buffer("mean", torch.empty(cout))
        self.register_buffer("var", torch.empty(cout))
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 1e-3))


def _seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                            conv_2=ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(cin, pool_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                          conv_2=ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, **row), conv_2=ConvBN(c7, 192, **col))
        self.tower_1 = _seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, **col), conv_2=ConvBN(c7, c7, **row),
                            conv_3=ConvBN(c7, c7, **col), conv_4=ConvBN(c7, 192, **row))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(cin, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)), conv_3=ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        # The 2015 TF graph pools by average in mixed_9 but by max in mixed_10; the TorchScript keeps that quirk.
        self.tower_2_pool = _avg_pool() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionTrunk(nn.Module):
    """Inception v3 up to the 2048-d average pool: input (x - 128) / 128 at 299x299, x in [0, 255]."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _seq(
            conv=ConvBN(3, 32, 3, stride=2), conv_1=ConvBN(32, 32, 3), conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, stride=2), conv_3=ConvBN(64, 80, 1), conv_4=ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, stride=2),
            mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),
            mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160), mixed_6=InceptionC(768, 160),
            mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768), mixed_9=InceptionE(1280, "avg"), mixed_10=InceptionE(2048, "max"),
            pool2=nn.AvgPool2d(8, stride=8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, 299, 299] -> [B, 2048]
        return self.layers(x).reshape(-1, 2048)
