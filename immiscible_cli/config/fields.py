"""What every config section shares: the base model (unknown fields and non-finite floats refused), the upper
bounds of counts and sizes, and the kimg types.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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
