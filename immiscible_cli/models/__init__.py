"""Networks only: no sampling, no guidance (objectives/guidance.py), no loading (networks.py)."""

from immiscible_cli.models.unet import UNet

__all__ = ["UNet"]
