"""The procedural shapes world (world.py) and its evaluator (evaluate.py, needs scipy).

from wuerstchen.shapes import ShapesDataset, eval_prompts
from wuerstchen.shapes.evaluate import detect, evaluate, score
"""

from .world import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    ShapesDataset,
    caption,
    eval_prompts,
    prompt_for,
    render,
    sample_scene,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELDOUT_PAIRS",
    "SHAPES",
    "SIZES",
    "Obj",
    "Scene",
    "ShapesDataset",
    "caption",
    "eval_prompts",
    "prompt_for",
    "render",
    "sample_scene",
    "vocabulary",
]
