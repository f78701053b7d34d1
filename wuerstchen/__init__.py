"""Würstchen: a three-stage text-to-image cascade (prior → decoder → VQGAN).

    from wuerstchen import DEFAULT_STAGE_C_TIMESTEPS, WuerstchenPipeline, shipped_model

The names below are imported on first use, so `import wuerstchen` (and `wuerstchen --help`) does
not pay for importing torch.
"""

from typing import Any

__all__ = [
    "DEFAULT_STAGE_C_TIMESTEPS",
    "PipelineSettings",
    "WuerstchenPipeline",
    "WuerstchenPipelineOutput",
    "shifted_timesteps",
    "shipped_model",
]
__version__ = "0.1.0"

_HOME = {
    "DEFAULT_STAGE_C_TIMESTEPS": "sampling",
    "PipelineSettings": "pipeline",
    "WuerstchenPipeline": "pipeline",
    "WuerstchenPipelineOutput": "pipeline",
    "shifted_timesteps": "sampling",
    "shipped_model": "assets",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'wuerstchen' has no attribute {name!r}")
