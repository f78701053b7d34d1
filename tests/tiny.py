"""Tiny Würstchen v2 and Stable Cascade components with random weights, built with diffusers' own
classes (the reference) and a character-level CLIP tokenizer, so nothing is downloaded."""

from __future__ import annotations

import dataclasses

import torch

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


def clip_vision_model(seed: int, width: int = 32, projection: int = 24):
    """A random CLIP image tower with projection (Stable Cascade's image encoder), 32-px input."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=projection,
    )  # fmt: skip
    return CLIPVisionModelWithProjection(config).eval().requires_grad_(False)


def cascade_components(seed: int = 0) -> dict:
    """The components of diffusers' StableCascadeCombinedPipeline, tiny and random."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import CLIPImageProcessor

    from wuerstchen.models.cascade import CASCADE_PRESETS

    c, b = CASCADE_PRESETS["tiny-c"], CASCADE_PRESETS["tiny-b"]
    return dict(
        prior_prior=randomize(StableCascadeUNet(**kwargs_of(c)), seed + 1),
        prior_text_encoder=clip_text_model(
            seed + 2, c.clip_text_in_channels, projection=c.clip_text_pooled_in_channels
        ),
        prior_tokenizer=char_tokenizer(),
        prior_scheduler=DDPMWuerstchenScheduler(),
        prior_image_encoder=clip_vision_model(seed + 6, projection=c.clip_image_in_channels),
        prior_feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        decoder=randomize(StableCascadeUNet(**kwargs_of(b)), seed + 3),
        text_encoder=clip_text_model(seed + 4, 32, projection=b.clip_text_pooled_in_channels),
        tokenizer=char_tokenizer(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=randomize(PaellaVQModel(**kwargs_of(STAGE_A_PRESETS["tiny"])), seed + 5),
    )


def run_both(ref, pipe, args: dict, gen) -> tuple:
    """diffusers' combined pipeline `ref` and ours on `args` with generators from `gen()`: the two
    images and the latents of each stage's last step (through each pipeline's step callbacks)."""
    want_lat, got_lat = {}, {}

    def capture(stage):
        def callback(_pipe, _i, _t, kwargs):
            want_lat[stage] = kwargs["latents"].clone()
            return {}

        return callback

    def hook(stage, _step, _total, latents):
        got_lat[stage] = latents.clone()

    want = ref(**args, generator=gen(), output_type="pt", prior_callback_on_step_end=capture("prior"),
               callback_on_step_end=capture("decoder")).images  # fmt: skip
    got = pipe(**args, generator=gen(), output_type="pt", step_hook=hook).images
    return want, got, want_lat, got_lat
