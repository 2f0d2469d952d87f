"""compressor: one toolchain for LLM compression."""

__version__ = "0.1.0"

from compressor import _hooks  # noqa: E402

# Sliced artifacts carry their own model type; make transformers' Auto classes know it as soon
# as transformers loads them (without importing transformers here: `compress --help` stays fast).
_hooks.after_import("transformers.models.auto.configuration_auto", "compressor.models.sliced", "register_config")
_hooks.after_import("transformers.models.auto.modeling_auto", "compressor.models.sliced", "register_model")
