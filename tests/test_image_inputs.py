"""Images in: image-to-image, inpainting and variations (wuerstchen.image_inputs), judged with the
shipped shapes model and the shapes evaluator, and run on tiny random pipelines of both generations.

The rates asserted are below the ones measured (stated beside each), by what 16 seeds can swing:
they are seeded, so they only move when the model, the sampler or the image path changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from wuerstchen import DEFAULT_STAGE_C_TIMESTEPS
from wuerstchen.errors import UserError
from wuerstchen.image_inputs import image_hash, mask_from_alpha
from wuerstchen.shapes.evaluate import detect, psnr
from wuerstchen.shapes.world import Obj, Scene, render
from wuerstchen.testing import random_cascade_pipeline, random_pipeline

T = DEFAULT_STAGE_C_TIMESTEPS


@pytest.fixture(scope="module")
def shipped():
    import wuerstchen
    from wuerstchen import WuerstchenPipeline

    return WuerstchenPipeline.from_pretrained(wuerstchen.shipped_model(), torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def red_circle(shipped):
    """A render of "a red circle" (seed 2: one red circle left of the centre, at (0.26, 0.56))."""
    image = shipped("a red circle", prior_timesteps=T, seed=2).images[0]
    (found,) = detect(image)[0]
    assert found.pair == ("red", "circle")
    return image, (found.cx, found.cy)


def at(found, place, pair, within=0.12) -> bool:
    return any(d.pair == pair and abs(d.cx - place[0]) < within and abs(d.cy - place[1]) < within for d in found)


def test_strength_one_is_text_to_image_and_zero_gives_back_the_image(shipped, red_circle):
    image, _ = red_circle
    again = shipped("a red circle", prior_timesteps=T, seed=2, image=image, strength=1.0).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))  # the same noise, the same steps
    back = shipped("a blue circle", prior_timesteps=T, seed=7, image=image, strength=0.0, num_images_per_prompt=2)
    for out in back.images:  # the prompt cannot act: no prior step runs; Stage B draws new details
        assert psnr(out, image) > 33  # measured 37.9 dB (seeds 7, 8; 35.9–36.2 for seeds 0–3): Stage B + A
    alone = shipped("", prior_timesteps=T, seed=7, image=image, strength=0.0, decoder_strength=0.0).images[0]
    assert psnr(alone, image) > 33  # Stage A alone on the image's own latent: measured 35.1 dB


def test_image_to_image_changes_the_colour_and_keeps_the_layout(shipped, red_circle):
    image, place = red_circle
    out = shipped(["a blue circle"] * 16, prior_timesteps=T, seed=100, image=image, strength=0.6).images
    hits = sum(at(detect(o)[0], place, ("blue", "circle")) for o in out)
    assert hits >= 9, hits  # measured 12/16 at strength 0.6 (0.5: 6/16, 0.7: 15/16)


def two_objects() -> tuple[Image.Image, Image.Image]:
    """A red circle left of a blue square, and a mask over the circle (white = repaint)."""
    scene = Scene((Obj("circle", "red", "large", 0.28, 0.5), Obj("square", "blue", "large", 0.72, 0.5)), "grey")
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle([9, 37, 63, 91], fill=255)  # the circle's box, ±0.21 of the side
    return render(scene), mask


def test_inpainting_repaints_inside_the_mask_and_keeps_every_pixel_outside(shipped):
    image, mask = two_objects()
    prompt = "a yellow circle to the left of a blue square"
    out = shipped([prompt] * 16, prior_timesteps=T, prior_guidance_scale=8.0, seed=200, image=image,
                  mask_image=mask).images  # fmt: skip
    outside = np.asarray(mask) == 0
    for o in out:
        assert np.array_equal(np.asarray(o)[outside], np.asarray(image)[outside])
    hits = sum(at(detect(o)[0], (0.28, 0.5), ("yellow", "circle")) for o in out)
    assert hits >= 9, hits  # measured 10/16 at guidance 8 (guidance 4: about 7/16)


def test_variations_keep_the_objects_and_differ_in_pixels(shipped, red_circle):
    image, place = red_circle
    out = shipped.variations(image, num_images=4, seed=300, prior_timesteps=T).images
    assert all(at(detect(o)[0], place, ("red", "circle")) for o in out)
    arrays = [np.asarray(o).astype(int) for o in out]
    assert all(np.abs(a - b).mean() > 0.5 for a, b in zip(arrays, arrays[1:], strict=False))  # new noise each
    assert all(np.abs(a - np.asarray(image)).mean() > 0.5 for a in arrays)


@pytest.mark.parametrize("make", [random_pipeline, random_cascade_pipeline], ids=["v2", "v3"])
def test_every_image_input_runs_on_both_generations(make):
    pipe = make(semantic=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    _, mask = two_objects()
    steps = dict(prior_num_inference_steps=3, num_inference_steps=2, output_type="np", height=128, width=128)
    for extra in ({"strength": 0.5}, {"mask_image": mask}, {"strength": 0.0}, {"decoder_strength": 0.5}):
        out = pipe(["a", "b"], image=image, seed=1, **steps, **extra).images
        assert out.shape == (2, 128, 128, 3) and np.isfinite(out).all()
        if "mask_image" in extra:
            outside = np.asarray(mask) == 0
            assert np.array_equal((out[0] * 255).round()[outside], np.asarray(image)[outside].astype(float))
    assert pipe.variations(image, num_images=2, seed=1, **steps).images.shape == (2, 128, 128, 3)


def test_stable_cascade_variations_use_the_image_embeddings():
    from tiny import clip_vision_model
    from transformers import CLIPImageProcessor

    pipe = random_cascade_pipeline()
    pipe.image_encoder = clip_vision_model(6, projection=pipe.prior.config.clip_image_in_channels)
    pipe.feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    seen = []
    pipe.image_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    steps = dict(prior_num_inference_steps=2, num_inference_steps=2, output_type="latent", seed=1)
    steps.update(height=128, width=128)
    red, blue = (Image.new("RGB", (64, 64), c) for c in ((220, 30, 30), (30, 80, 230)))
    a, b = (pipe.variations(im, num_images=1, **steps).images for im in (red, blue))
    assert seen == [(1, 3, 32, 32)] * 2 and np.isfinite(a).all()
    assert np.abs(a - b).mean() > 1e-3  # the image conditions the prior (same seed, same empty prompt)


def test_bad_image_inputs_are_one_line_errors():
    pipe = random_pipeline(semantic=True)
    image = Image.new("RGB", (128, 128), "red")
    cases = {  # message: (arguments, the argument at fault, which the HTTP API answers as `param`)
        "mask is 64×64 px but the image is 128×128": (dict(image=image, mask_image=Image.new("L", (64, 64))),
                                                      "mask_image"),
        "strength` must be a number in [0, 1]": (dict(image=image, strength=1.5), "strength"),
        "need an `image`": (dict(mask_image=Image.new("L", (128, 128))), "image"),
        "transparent pixels": (dict(image=image, mask_image=Image.new("RGBA", (128, 128), (255, 255, 255, 0))),
                               "mask_image"),
        "different sizes": (dict(image=[image, Image.new("RGB", (64, 64))]), "image"),
        "must be a PIL image": (dict(image="in.png"), "image"),
        "values outside [0, 1]": (dict(image=torch.full((3, 128, 128), 2.0)), "image"),
    }  # fmt: skip
    for message, (kwargs, param) in cases.items():
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
            pipe("a", prior_num_inference_steps=1, num_inference_steps=1, **kwargs)
        assert "\n" not in str(err.value) and err.value.param == param, (message, err.value.param)
    no_compressor = random_pipeline()
    with pytest.raises(UserError, match="no semantic compressor"):
        no_compressor("a", image=image, prior_num_inference_steps=1, num_inference_steps=1)


def test_image_sizes_masks_and_hashes():
    pipe = random_pipeline(semantic=True)
    steps = dict(prior_num_inference_steps=1, num_inference_steps=1, output_type="np", seed=0)
    wide = Image.new("RGB", (300, 150), "blue")
    assert pipe("a", image=wide, **steps).images.shape[1:3] == (128, 256)  # its size, snapped to 128 px
    assert pipe("a", image=wide, height=128, width=128, **steps).images.shape[1:3] == (128, 128)  # crop
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    rgba.putpixel((1, 2), (0, 0, 0, 0))
    mask = np.asarray(mask_from_alpha(rgba))
    assert mask[2, 1] == 255 and mask.sum() == 255  # transparent = repaint, as OpenAI's edits
    a, b = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "red")
    assert image_hash(a) == image_hash(b) != image_hash(Image.new("RGB", (8, 8), "blue"))
