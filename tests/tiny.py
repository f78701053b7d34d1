"""Tiny Würstchen components with random weights, built with diffusers' own classes (the reference)
and a character-level CLIP tokenizer, so nothing is downloaded."""

from __future__ import annotations

import dataclasses

from wuerstchen.models.stage_a import STAGE_A_PRESETS
from wuerstchen.models.stage_b import STAGE_B_PRESETS
from wuerstchen.models.stage_c import STAGE_C_PRESETS
from wuerstchen.testing import char_tokenizer, clip_text_model, randomize


def kwargs_of(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def diffusers_components(seed: int = 0) -> dict:
    """The nine components of diffusers' WuerstchenCombinedPipeline, tiny and random."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    return dict(
        prior_prior=randomize(WuerstchenPrior(**kwargs_of(STAGE_C_PRESETS["tiny"])), seed + 1),
        prior_text_encoder=clip_text_model(seed + 2),
        prior_tokenizer=char_tokenizer(),
        prior_scheduler=DDPMWuerstchenScheduler(),
        decoder=randomize(WuerstchenDiffNeXt(**kwargs_of(STAGE_B_PRESETS["tiny"])), seed + 3),
        text_encoder=clip_text_model(seed + 4),
        tokenizer=char_tokenizer(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=randomize(PaellaVQModel(**kwargs_of(STAGE_A_PRESETS["tiny"])), seed + 5),
    )
