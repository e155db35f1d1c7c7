"""Human-readable quantities shared by every layer: durations for progress lines and the app."""

from __future__ import annotations

import math
from typing import Optional


def format_duration(seconds: Optional[float], unknown: str = "?") -> str:
    """A short duration: 59s, 1m01s, 2h01m (``unknown`` when there is no finite value)."""
    if seconds is None or not math.isfinite(seconds):
        return unknown
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
