"""The training stage (being split into progress, plan, hf_loop and fast_loop)."""

from .hf_loop import format_duration, latest_checkpoint, train  # noqa: F401
