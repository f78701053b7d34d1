"""Würstchen: a three-stage text-to-image cascade (prior → decoder → VQGAN).

from wuerstchen import DEFAULT_STAGE_C_TIMESTEPS, WuerstchenPipeline
"""

from .pipeline import PipelineSettings, WuerstchenPipeline, WuerstchenPipelineOutput
from .sampling import DEFAULT_STAGE_C_TIMESTEPS

__all__ = ["DEFAULT_STAGE_C_TIMESTEPS", "PipelineSettings", "WuerstchenPipeline", "WuerstchenPipelineOutput"]
__version__ = "0.1.0"
