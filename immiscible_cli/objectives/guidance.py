"""Classifier-free guidance (Ho & Salimans 2022), shared by every objective's samplers."""

from __future__ import annotations

import torch
from torch import nn


def null_label(net: nn.Module) -> int:
    """The "no label" class index of a conditional net (its num_classes), also through DDP's `.module`."""
    num_classes = getattr(net, "num_classes", None)
    if num_classes is None:
        num_classes = getattr(getattr(net, "module", None), "num_classes", None)
    if num_classes is None:
        raise ValueError("labels given, but the network is not class-conditional (model.num_classes is None)")
    return num_classes


def guided_prediction(net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                      guidance: float) -> torch.Tensor:
    """net(x, t, labels) with classifier-free guidance (Ho & Salimans 2022): uncond + w (cond - uncond).

    Guidance applies only when labels are given and w != 1; conditional and unconditional predictions come from
    one forward over the concatenated batch [cond; uncond] (the null label is the net's num_classes).
    """
    if labels is None or guidance == 1.0:
        return net(x, t, labels)
    null = torch.full_like(labels, null_label(net))
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # [2B, C, H, W]
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)
