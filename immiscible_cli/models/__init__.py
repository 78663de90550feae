"""Networks: the bundled UNet (models/unet.py) and classifier-free guidance around it."""

from immiscible_cli.models.unet import UNet, guided_prediction, null_label

__all__ = ["UNet", "guided_prediction", "null_label"]
