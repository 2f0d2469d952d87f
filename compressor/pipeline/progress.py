"""Moved to `compressor.progress` (evaluation and formats use it too); kept so older imports work."""

from compressor.progress import LineProgress, Progress, RichProgress, for_terminal  # noqa: F401
