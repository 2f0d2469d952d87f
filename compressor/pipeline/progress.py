"""Moved to `compressor.progress` (evaluation and formats use it too); kept so older imports work."""

from compressor.progress import Progress, RichProgress  # noqa: F401
