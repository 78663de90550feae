"""The user cache: dataset downloads and FID reference statistics, never in site-packages (unlike clean-fid)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "IMMISCIBLE_CACHE"


def cache_root() -> Path:
    """$IMMISCIBLE_CACHE, else ~/.cache/immiscible."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "immiscible").expanduser()
