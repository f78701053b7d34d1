"""The shapes world is deterministic and truthful, and its evaluator reads renders back exactly.

pytest -q tests/test_shapes.py
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import ImageFilter

from wuerstchen.shapes import world
from wuerstchen.shapes.evaluate import detect, evaluate, psnr, score
from wuerstchen.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
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


def scenes(n: int, split: str, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def test_dataset_is_deterministic_per_item():
    a, b = ShapesDataset(50, seed=7), ShapesDataset(1000, seed=7)
    for i in (0, 3, 49):
        (im_a, cap_a, sc_a), (im_b, cap_b, sc_b) = a[i], b[i]
        assert im_a.tobytes() == im_b.tobytes() and cap_a == cap_b and sc_a == sc_b
    assert a[0][2] != ShapesDataset(50, seed=8)[0][2]
    assert a[0][2] != ShapesDataset(50, seed=7, split="heldout")[0][2]
    assert eval_prompts(30, seed=1) == eval_prompts(30, seed=1)
    with pytest.raises(IndexError):
        a[50]


def test_heldout_pairs_never_in_train():
    assert len(HELDOUT_PAIRS) >= 4
    train = scenes(2000, "train")
    seen = {o.pair for s in train for o in s.objects}
    assert not seen & set(HELDOUT_PAIRS)
    # Held out are combinations only: every colour and every shape is still trained on.
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    for s in scenes(500, "heldout"):
        assert any(o.pair in HELDOUT_PAIRS for o in s.objects)
    assert all(any(o.pair in HELDOUT_PAIRS for o in s.objects) for _, s in eval_prompts(60, split="heldout"))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_scene_invariants(split: str):
    found_kinds = set()
    for s in scenes(2000, split, seed=1):
        found_kinds.add(s.kind)
        assert 1 <= len(s.objects) <= 3
        for o in s.objects:
            # Background: never an object's colour, and far from it in Lab.
            assert o.colour != s.background
            assert world.delta_e(BACKGROUNDS[s.background], COLOURS[o.colour]) >= world.MIN_BACKGROUND_DELTA_E
            assert o.half + world.EDGE <= o.cx <= 1 - o.half - world.EDGE
            assert o.half + world.EDGE <= o.cy <= 1 - o.half - world.EDGE
        for a, b in itertools.combinations(s.objects, 2):
            gap = a.half + b.half + world.MARGIN
            assert abs(a.cx - b.cx) >= gap or abs(a.cy - b.cy) >= gap
        if s.kind == "pair":
            a, b = s.objects
            dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
            assert a.pair != b.pair and min(dx, dy) <= 0.5 * max(dx, dy)  # the relation is clear
        if s.kind == "count":
            assert len({o.size for o in s.objects}) == 1
    assert found_kinds == {"single", "pair", "count"}


def test_objects_do_not_overlap_in_pixels():
    # Each object drawn alone marks its own pixels; no pixel is marked twice.
    for s in scenes(40, "train", seed=2):
        if len(s.objects) < 2:
            continue
        # Grey is no object's colour, so every pixel an object touches differs from it.
        masks = [(np.asarray(render(Scene((o,), "grey"), 128)) != BACKGROUNDS["grey"]).any(-1) for o in s.objects]
        assert np.sum(masks, axis=0).max() == 1


# What a person means by each name, as loose RGB bounds on the exact interior colour.
EXPECTED = {
    "red": lambda r, g, b: r > 150 and g < 80 and b < 80,
    "green": lambda r, g, b: g > 120 and r < 100 and b < 100,
    "blue": lambda r, g, b: b > 150 and r < 80 and g < 120,
    "yellow": lambda r, g, b: r > 200 and g > 180 and b < 80,
    "orange": lambda r, g, b: r > 200 and 100 < g < 180 and b < 60,
    "purple": lambda r, g, b: 100 < r < 180 and g < 90 and b > 130,
    "pink": lambda r, g, b: r > 200 and 90 < g < 170 and b > 150,
    "cyan": lambda r, g, b: r < 100 and g > 170 and b > 170,
    "brown": lambda r, g, b: 90 < r < 160 and 40 < g < 110 and b < 70 and r > g > b,
    "white": lambda r, g, b: min(r, g, b) > 220,
    "black": lambda r, g, b: max(r, g, b) < 50,
    "grey": lambda r, g, b: 100 < r < 160 and r == g == b,
    "beige": lambda r, g, b: r > 200 and g > 180 and 140 < b < 200 and r > g > b,
}


@pytest.mark.parametrize("colour", list(COLOURS))
def test_colour_names_mean_what_they_say(colour: str):
    background = "grey" if colour != "grey" else "white"
    for size in (128, 64):
        image = np.asarray(render(Scene((Obj("square", colour, "small", 0.5, 0.5),), background), size))
        interior = tuple(int(v) for v in image[size // 2, size // 2])
        assert interior == COLOURS[colour]  # supersampling keeps the interior exact
        assert EXPECTED[colour](*interior), (colour, interior)
        assert tuple(image[0, 0]) == BACKGROUNDS[background]
    assert set(EXPECTED) == set(COLOURS) | set(BACKGROUNDS)
    for name, rgb in BACKGROUNDS.items():
        assert EXPECTED[name](*rgb), name


def test_captions_use_the_vocabulary_and_name_the_objects():
    words = set(vocabulary())
    assert {"crosses", "rhombuses", "two", "three", "gray", "grey"} <= words
    assert not {"crosss", "rhombuss", "pluss"} & words  # plurals are spelled right
    rng = np.random.default_rng(0)
    for s in scenes(2000, "train", seed=3) + scenes(300, "heldout", seed=3):
        text = caption(s, rng)
        assert set(text.split()) <= words, text
        assert all(o.colour in text.split() for o in s.objects)
        assert set(prompt_for(s).split()) <= words


def test_canonical_prompts():
    red_circle = Obj("circle", "red", "small", 0.2, 0.5)
    blue_square = Obj("square", "blue", "large", 0.7, 0.45)
    assert prompt_for(Scene((red_circle,), "grey")) == "a red circle"
    assert prompt_for(Scene((Obj("circle", "orange", "large", 0.5, 0.5),), "grey")) == "an orange circle"
    pair = Scene((red_circle, blue_square), "grey")
    assert pair.relation == "left of"
    assert prompt_for(pair) == "a red circle to the left of a blue square"
    assert prompt_for(Scene((blue_square, red_circle), "grey")) == "a blue square to the right of a red circle"
    twins = Scene((Obj("triangle", "green", "small", 0.2, 0.2), Obj("triangle", "green", "small", 0.7, 0.7)), "grey")
    assert prompt_for(twins) == "two green triangles"


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("size", [128, 64])
def test_evaluator_reads_renders_back(split: str, size: int):
    prompts = eval_prompts(300, seed=11, split=split)
    images = [render(s, size) for _, s in prompts]
    metrics = evaluate(images, prompts)
    assert metrics["n"] == 300 and metrics["n_relation"] == 100 and metrics["n_count"] == 100
    for key in ("colour_acc", "colour_shape_acc", "relation_acc", "count_acc", "exact_acc"):
        assert metrics[key] >= 0.99, (key, metrics)
    assert metrics["pair_colour_shape_acc"] >= 0.99 and metrics["relation_when_drawn_acc"] >= 0.99, metrics
    # Beyond the metrics: sizes, positions and the background are read back too.
    for image, (_, s) in zip(images[:60], prompts[:60], strict=True):
        found, background = detect(image)
        assert background == s.background
        for o in s.objects:
            d = min(found, key=lambda d: (d.cx - o.cx) ** 2 + (d.cy - o.cy) ** 2)
            assert d.pair == o.pair and d.size == o.size
            assert abs(d.cx - o.cx) < 0.05 and abs(d.cy - o.cy) < 0.05  # centroid, not box centre


def test_evaluator_tolerates_blur_and_noise():
    # Generated images are softer and noisier than renders; the evaluator must not fall apart.
    rng = np.random.default_rng(0)
    prompts = eval_prompts(90, seed=12, split="heldout")
    images = []
    for _, s in prompts:
        soft = np.asarray(render(s, 128).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
        images.append(np.clip(soft + rng.uniform(-15, 15, 3) + rng.normal(0, 6, soft.shape), 0, 255) / 255)
    metrics = evaluate(images, prompts)
    assert metrics["colour_shape_acc"] >= 0.95 and metrics["relation_acc"] >= 0.9, metrics


def test_evaluator_fails_wrong_prompts():
    red_circle = Obj("circle", "red", "large", 0.25, 0.5)
    blue_square = Obj("square", "blue", "small", 0.75, 0.5)
    image = render(Scene((red_circle,), "grey"))
    wrong = score(Scene((Obj("square", "blue", "large", 0.5, 0.5),), "grey"), image)
    assert not wrong["colour"] and not wrong["colour_shape"] and not wrong["exact"]
    half_right = score(("a red square", Scene((Obj("square", "red", "large", 0.5, 0.5),), "grey")), image)
    assert half_right["colour"] and not half_right["colour_shape"]
    right = score(Scene((red_circle,), "white"), image)
    assert right["colour"] and right["colour_shape"] and right["exact"]

    pair = render(Scene((red_circle, blue_square), "white"))
    assert score(Scene((red_circle, blue_square), "white"), pair)["relation"]
    swapped = Scene((dataclasses.replace(red_circle, cx=0.75), dataclasses.replace(blue_square, cx=0.25)), "white")
    assert swapped.relation == "right of" and not score(swapped, pair)["relation"]
    # Both drawn, one placed wrong; a second image with the square missing.
    circle_only = render(Scene((red_circle,), "white"))
    metrics = evaluate([pair, pair, circle_only], [Scene((red_circle, blue_square), "white"), swapped, swapped])
    assert metrics["pair_colour_shape_acc"] == pytest.approx(2 / 3) and metrics["relation_when_drawn_acc"] == 0.5
    assert evaluate([image], [Scene((red_circle,), "white")])["relation_when_drawn_acc"] is None

    two = Scene((red_circle, Obj("circle", "red", "large", 0.75, 0.5)), "grey")
    three = Scene((*two.objects, Obj("circle", "red", "large", 0.5, 0.15)), "grey")
    assert score(two, render(two))["count"] and not score(three, render(two))["count"]


def test_psnr():
    image = np.asarray(render(sample_scene(np.random.default_rng(0))))
    assert psnr(image, image.copy()) == float("inf")
    noisy = np.clip(image + np.random.default_rng(1).normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    value = psnr(image, noisy)
    assert 20 < value < 35  # σ = 10/255 → about 28 dB
    assert psnr(image / 255.0, noisy / 255.0) == pytest.approx(value)
