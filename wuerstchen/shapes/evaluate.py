"""Read a shapes-world image back into objects, and score images against the prompts they were
generated from. Plain image analysis (numpy + scipy), no learned model.

    from wuerstchen.shapes.evaluate import detect, evaluate
    objects, background = detect(image)
    metrics = evaluate(images, eval_prompts(300, seed=0, split="heldout"))

How `detect` works: the background is the median colour of the image border. Every pixel goes to
the nearest of {background, palette colours} in CIE Lab, so thresholds adapt to how close a
colour is to the background. Connected non-background regions above `min_area` are objects; an
object's colour is the majority palette colour of its higher-contrast half (edge pixels, mixtures
of object and background, are left out). Its shape is found by synthesis: each candidate shape is drawn
with the same centroid and spread as the object's coverage map, at the same resolution, and the
one that reproduces the pixels best wins — this keeps 10-pixel objects separable because the
candidates carry the same pixel blur as the image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..errors import UserError
from .world import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, draw_shape, relation_of, srgb_to_lab

# A shape whose best synthesis still misses this fraction of its coverage is not one of ours.
MAX_MISFIT = 0.5
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Detection:
    shape: str  # one of SHAPES, or "unknown" when no shape explains the region
    colour: str
    cx: float  # centroid as a fraction of the width
    cy: float  # centroid as a fraction of the height
    area: float  # fraction of the image
    size: str  # "small" | "large", from the fitted box
    misfit: float  # |synthesised − observed coverage| / observed coverage of the best shape

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in 0..255 from a PIL image or a uint8 / [0, 1]-float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    a = np.asarray(image)
    rgb = np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a[..., :3]
    rgb = rgb.astype(np.float64)
    return rgb if np.issubdtype(a.dtype, np.integer) else np.clip(rgb, 0, 1) * 255


@functools.cache
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """Centroid (x, y) and standard deviations (x, y) of a shape drawn in a box of half-side 1."""
    n = 512
    canvas = Image.new("L", (n, n), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, n / 2, n / 2, n * 0.4, n * 0.4, 255)
    mx, my, sx, sy = _moments(np.asarray(canvas, dtype=np.float64))
    scale = n * 0.4
    return (mx - n / 2) / scale, (my - n / 2) / scale, sx / scale, sy / scale


def _moments(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """Centroid and standard deviations of a coverage map, pixel centres at index + 0.5."""
    ys, xs = np.indices(alpha.shape) + 0.5
    m = alpha.sum()
    mx, my = (alpha * xs).sum() / m, (alpha * ys).sum() / m
    sx = math.sqrt((alpha * (xs - mx) ** 2).sum() / m)
    sy = math.sqrt((alpha * (ys - my) ** 2).sum() / m)
    return mx, my, sx, sy


def _synthesise(shape: str, alpha: np.ndarray) -> tuple[np.ndarray, float]:
    """Coverage of `shape` matched to the moments of `alpha`, rendered like the world renders,
    and the half-side of its box in pixels."""
    mx, my, sx, sy = _moments(alpha)
    ux, uy, usx, usy = _unit_moments(shape)
    hx, hy = sx / usx, sy / usy
    s = _SUPERSAMPLE
    canvas = Image.new("L", (alpha.shape[1] * s, alpha.shape[0] * s), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (mx - ux * hx) * s, (my - uy * hy) * s, hx * s, hy * s, 255)
    return np.asarray(canvas.reduce(s), dtype=np.float64) / 255, (hx + hy) / 2


def _classify_shape(alpha: np.ndarray) -> tuple[str, float, float]:
    """(best shape, its misfit, its box half-side in pixels) for one object's coverage map."""
    fits = []
    for shape in SHAPES:
        synth, half = _synthesise(shape, alpha)
        fits.append((np.abs(synth - alpha).sum() / alpha.sum(), shape, half))
    misfit, shape, half = min(fits)
    return (shape if misfit <= MAX_MISFIT else "unknown"), float(misfit), half


@functools.cache
def _lab(name: str) -> np.ndarray:
    return srgb_to_lab(np.array(COLOURS.get(name) or BACKGROUNDS[name]))


def _nearest(rgb: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest Lab centre for each pixel of an (H, W, 3) image. Renders hold a few
    hundred distinct colours, so the distances are computed once per distinct 8-bit colour."""
    rgb8 = np.round(rgb).astype(np.int64)
    keys = (rgb8[..., 0] << 16) | (rgb8[..., 1] << 8) | rgb8[..., 2]
    uniq, inverse = np.unique(keys.ravel(), return_inverse=True)
    colours = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], axis=-1)
    d2 = ((srgb_to_lab(colours)[:, None, :] - centres) ** 2).sum(-1)
    return d2.argmin(-1)[inverse].reshape(keys.shape)


def detect(image: Image.Image | np.ndarray, min_area: float = 0.003) -> tuple[list[Detection], str]:
    """The objects in an image (largest first) and the name of its background colour.

    `min_area` (a fraction of the image) drops specks: the smallest world object covers ≥ 1.2 %.
    """
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    bg_lab = srgb_to_lab(bg)
    background = min(BACKGROUNDS, key=lambda b: np.linalg.norm(_lab(b) - bg_lab))

    # A palette colour within reach of the background (white object, white background) cannot be
    # told from it, and the world never draws one there.
    names = [c for c in COLOURS if np.linalg.norm(_lab(c) - bg_lab) >= 20]
    centres = np.stack([bg_lab] + [_lab(c) for c in names])
    nearest = _nearest(rgb, centres)  # (H, W); 0 = background

    regions, _ = ndimage.label(nearest > 0, structure=np.ones((3, 3)))
    found = []
    for k, box in enumerate(ndimage.find_objects(regions), start=1):
        mask = regions[box] == k
        area = int(mask.sum())
        if area < min_area * h * w:
            continue
        # The object's own colour is best seen where the pixels are farthest from the background:
        # in the interior of a sharp render, at the peak of a blurred one.
        contrast = np.linalg.norm(rgb[box] - bg, axis=-1)
        interior = mask & (contrast >= np.median(contrast[mask]))
        votes = np.bincount(nearest[box][interior], minlength=len(centres))[1:]
        colour = names[int(votes.argmax())]

        # Coverage: how far each pixel has moved from the background towards the object's colour.
        # Only within 2 px of the region and off other regions, so that noise elsewhere and
        # neighbours do not add up.
        tint = np.median(rgb[box][interior], axis=0) - bg
        ys = slice(max(box[0].start - 2, 0), min(box[0].stop + 2, h))
        xs = slice(max(box[1].start - 2, 0), min(box[1].stop + 2, w))
        window = regions[ys, xs]
        near = ndimage.binary_dilation(window == k, iterations=2) & ((window == k) | (window == 0))
        alpha = np.clip((rgb[ys, xs] - bg) @ tint / max(tint @ tint, 1e-6), 0, 1) * near
        if alpha.sum() < 1:  # not even one pixel's worth of the colour: noise, not an object
            continue
        shape, misfit, half = _classify_shape(alpha)

        mx, my, _, _ = _moments(alpha)
        size = "small" if half / w < math.sqrt(SIZES["small"] * SIZES["large"]) else "large"
        found.append(Detection(shape, colour, (xs.start + mx) / w, (ys.start + my) / h, area / (h * w), size, misfit))
    found.sort(key=lambda d: -d.area)
    return found, background


def _scene(prompt_scene: Scene | tuple[str, Scene]) -> Scene:
    return prompt_scene if isinstance(prompt_scene, Scene) else prompt_scene[1]


def score(prompt_scene: Scene | tuple[str, Scene], image: Image.Image | np.ndarray) -> dict:
    """How well `image` shows the prompt's scene (a Scene or a (prompt, scene) pair).

    colour: every colour named is present. colour_shape: every (colour, shape) named is present.
    count (count prompts, else None): each named kind appears exactly as often as named.
    relation (pair prompts, else None): both objects found and, by their centroids, the first is
    where the prompt says along the axis where they differ most — the rule the world's captions use.
    exact: the detected objects are exactly the prompt's, as a multiset of (colour, shape).
    """
    scene = _scene(prompt_scene)
    found, _ = detect(image)
    want = Counter(o.pair for o in scene.objects)
    got = Counter(d.pair for d in found)
    colours = {d.colour for d in found}
    result = {
        "kind": scene.kind,
        "colour": all(c in colours for c, _ in want),
        "colour_shape": all(got[p] > 0 for p in want),
        "count": all(got[p] == n for p, n in want.items()) if scene.kind == "count" else None,
        "relation": None,
        "exact": got == want,
    }
    if scene.kind == "pair":
        a, b = (next((d for d in found if d.pair == o.pair), None) for o in scene.objects)  # largest
        result["relation"] = a is not None and b is not None and relation_of(a.cx, a.cy, b.cx, b.cy) == scene.relation
    return result


def evaluate(
    images: Sequence[Image.Image | np.ndarray], prompt_scenes: Sequence[Scene | tuple[str, Scene]]
) -> dict[str, float | int | None]:
    """Accuracies over all prompts (colour, colour_shape, exact), pair prompts (relation) and
    count prompts (count); None where no prompt of that kind was given. For pair prompts also
    pair_colour_shape (both objects drawn) and relation_when_drawn (the relation right among those),
    which tell a model that cannot draw two objects from one that cannot place them."""
    if len(images) != len(prompt_scenes):
        raise UserError(f"{len(images)} images for {len(prompt_scenes)} prompts")
    scores = [score(p, im) for im, p in zip(images, prompt_scenes, strict=True)]

    def mean(key: str, among: list[dict] = scores) -> float | None:
        vals = [s[key] for s in among if s[key] is not None]
        return float(np.mean(vals)) if vals else None

    pairs = [s for s in scores if s["kind"] == "pair"]

    return {
        "colour_acc": mean("colour"),
        "colour_shape_acc": mean("colour_shape"),
        "relation_acc": mean("relation"),
        "count_acc": mean("count"),
        "exact_acc": mean("exact"),
        "pair_colour_shape_acc": mean("colour_shape", pairs),
        "relation_when_drawn_acc": mean("relation", [s for s in pairs if s["colour_shape"]]),
        "n": len(scores),
        "n_relation": sum(s["relation"] is not None for s in scores),
        "n_count": sum(s["count"] is not None for s in scores),
    }


def _unit(image: Image.Image | np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    return a / 255.0 if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64)


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB; uint8 images are taken as 0..255, floats as 0..1."""
    x, y = _unit(a), _unit(b)
    if x.shape != y.shape:
        raise UserError(f"shapes differ: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)
