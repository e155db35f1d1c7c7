"""The export stage (being split into steps)."""

from .steps import export_run  # noqa: F401
