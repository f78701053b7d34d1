"""A procedural world of captioned images: 1–3 flat shapes on a plain background.

    from wuerstchen.shapes import ShapesDataset, eval_prompts, render
    image, caption, scene = ShapesDataset(n=10_000, seed=0)[7]
    prompts = eval_prompts(300, seed=0, split="heldout")   # [(prompt, scene), ...]

Everything is numpy + PIL and deterministic: item i of a dataset depends only on (seed, split, i).
Positions and sizes are fractions of the canvas, so one scene renders at any resolution. The
`heldout` split holds colour–shape pairs (`HELDOUT_PAIRS`) that the `train` split never shows, to
measure compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError

# Object colours, chosen pairwise ≥ 39 apart in CIE Lab (ΔE76) so that each name is unmistakable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "yellow": (245, 215, 30),
    "orange": (250, 150, 20),
    "purple": (150, 40, 170),
    "pink": (250, 130, 200),
    "cyan": (40, 210, 220),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Backgrounds: two of their own plus white and black, which a scene only uses when it is far from
# every object in it (see `allowed_backgrounds`).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (225, 205, 165),
    "white": COLOURS["white"],
    "black": COLOURS["black"],
}
MIN_BACKGROUND_DELTA_E = 40.0

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
# Half the side of an object's bounding box, as a fraction of the canvas side.
SIZES: dict[str, float] = {"small": 0.09, "large": 0.16}
KINDS = ("single", "pair", "count")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Never in `train`; every `heldout` scene contains at least one. Each colour and shape still
# appears in training in other combinations.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("orange", "circle"),
    ("purple", "triangle"),
    ("green", "star"),
    ("pink", "square"),
    ("cyan", "diamond"),
    ("yellow", "cross"),
)
_ALL_PAIRS = tuple(itertools.product(COLOURS, SHAPES))
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS)

MARGIN = 0.06  # least gap between two objects' bounding boxes
EDGE = 0.03  # least gap between a bounding box and the canvas edge


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str  # "small" | "large"
    cx: float  # centre, as a fraction of the width (0 = left)
    cy: float  # centre, as a fraction of the height (0 = top)

    @property
    def half(self) -> float:
        return SIZES[self.size]

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    @property
    def kind(self) -> str:
        """single: one object; count: 2–3 identical objects; pair: two different objects."""
        if len(self.objects) == 1:
            return "single"
        return "count" if len({o.pair for o in self.objects}) == 1 else "pair"

    @property
    def relation(self) -> str | None:
        """Where objects[0] is relative to objects[1] (pair scenes), by the dominant axis."""
        if self.kind != "pair":
            return None
        return relation_of(self.objects[0].cx, self.objects[0].cy, self.objects[1].cx, self.objects[1].cy)


def relation_of(ax: float, ay: float, bx: float, by: float) -> str:
    """The relation of point a to point b along the axis where they differ most (y points down)."""
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of sRGB values in 0..255, shape (..., 3) → (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(srgb_to_lab(np.array(a)) - srgb_to_lab(np.array(b))))


@functools.cache
def allowed_backgrounds(colours: frozenset[str]) -> tuple[str, ...]:
    """Backgrounds at least MIN_BACKGROUND_DELTA_E from every given object colour."""
    ok = [
        bg
        for bg, rgb in BACKGROUNDS.items()
        if all(delta_e(rgb, COLOURS[c]) >= MIN_BACKGROUND_DELTA_E for c in colours)
    ]
    assert ok, colours  # cannot happen: grey is ≥ 40 from every object colour
    return tuple(ok)


# ---------------------------------------------------------------------------------------------
# Sampling


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _separated(a: Obj, b: Obj) -> bool:
    """Bounding boxes at least MARGIN apart along x or y (shapes lie inside their boxes)."""
    gap = a.half + b.half + MARGIN
    return abs(a.cx - b.cx) >= gap or abs(a.cy - b.cy) >= gap


def _place(
    rng: np.random.Generator, pairs: list[tuple[str, str]], sizes: list[str], relation: str | None
) -> tuple[Obj, ...]:
    """Rejection-sample centres so that the boxes stay on the canvas and apart; for two objects
    with a relation, also make it unambiguous: the other axis differs by at most half as much."""
    for _ in range(10_000):
        objs = []
        for (colour, shape), size in zip(pairs, sizes, strict=True):
            lo = SIZES[size] + EDGE
            cx, cy = rng.uniform(lo, 1 - lo, size=2)
            objs.append(Obj(shape, colour, size, float(cx), float(cy)))
        if not all(_separated(a, b) for a, b in itertools.combinations(objs, 2)):
            continue
        if relation is not None:
            a, b = objs
            dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
            if relation_of(a.cx, a.cy, b.cx, b.cy) != relation or min(dx, dy) > 0.5 * max(dx, dy):
                continue
        return tuple(objs)
    raise RuntimeError("could not place the objects")  # unreachable: even 3 large objects fit ~3 % of tries


def sample_scene(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> Scene:
    """One random scene. `split="heldout"` puts a HELDOUT_PAIRS pair in every scene; `"train"`
    never does. `kind` (single | pair | count) defaults to a random one."""
    if split not in ("train", "heldout"):
        raise UserError(f"split must be 'train' or 'heldout', got {split!r}")
    if kind is None:
        kind = KINDS[int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
    first = _pick(rng, HELDOUT_PAIRS if split == "heldout" else _TRAIN_PAIRS)
    relation = None
    if kind == "single":
        pairs = [first]
        sizes = [_pick(rng, tuple(SIZES))]
    elif kind == "count":
        pairs = [first] * (2 + int(rng.integers(2)))
        sizes = [_pick(rng, tuple(SIZES))] * len(pairs)  # one size, so "two small ..." is true
    elif kind == "pair":
        others = _TRAIN_PAIRS if split == "train" else _ALL_PAIRS
        second = _pick(rng, [p for p in others if p != first])
        pairs = [first, second] if rng.random() < 0.5 else [second, first]
        sizes = [_pick(rng, tuple(SIZES)) for _ in pairs]
        relation = _pick(rng, RELATIONS)
    else:
        raise UserError(f"kind must be one of {KINDS}, got {kind!r}")
    objects = _place(rng, pairs, sizes, relation)
    background = _pick(rng, allowed_backgrounds(frozenset(c for c, _ in pairs)))
    return Scene(objects, background)


# ---------------------------------------------------------------------------------------------
# Rendering


def _star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    angles = np.pi * np.arange(2 * points) / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    xs, ys = radii * np.cos(angles), radii * np.sin(angles)
    ys = ys - (ys.max() + ys.min()) / 2  # centre the box vertically: the tips reach ±0.905
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


# Outlines in a box of half-side 1 (y down). Proportions differ so shapes stay separable at 10 px.
_W = 0.34  # half the width of a cross arm
# fmt: off
_CROSS = [
    (-_W, -0.95), (_W, -0.95), (_W, -_W), (0.95, -_W), (0.95, _W), (_W, _W),
    (_W, 0.95), (-_W, 0.95), (-_W, _W), (-0.95, _W), (-0.95, -_W), (-_W, -_W),
]
# fmt: on
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)],
    "diamond": [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)],
    "cross": _CROSS,
    "star": _star(),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, hx: float, hy: float, fill) -> None:
    """Draw one shape centred at pixel (cx, cy) in a box of half-sides (hx, hy) pixels (the world
    uses square boxes; the evaluator stretches shapes to fit what it sees)."""
    if shape == "circle":
        draw.ellipse([cx - hx, cy - hy, cx + hx, cy + hy], fill=fill)
    else:
        draw.polygon([(cx + x * hx, cy + y * hy) for x, y in POLYGONS[shape]], fill=fill)


def render(scene: Scene, size: int = 128, supersample: int = 4) -> Image.Image:
    """RGB image of the scene. Drawn at `supersample`× and box-filtered down: edges are
    anti-aliased while every pixel fully inside an object keeps its exact palette colour."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        half = o.half * big
        draw_shape(draw, o.shape, o.cx * big, o.cy * big, half, half, COLOURS[o.colour])
    return image.reduce(supersample) if supersample > 1 else image


# ---------------------------------------------------------------------------------------------
# Captions

_PREFIXES = ("", "", "an image of ", "a picture of ", "a picture showing ", "a drawing of ")
_SHAPE_WORDS = {
    "circle": ("circle", "circle", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "diamond", "rhombus"),
    "cross": ("cross", "cross", "plus"),
    "star": ("star",),
}
_PLURAL = {"cross": "crosses", "plus": "pluses", "rhombus": "rhombuses"}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_BACKGROUND_WORDS = {"grey": ("grey", "gray"), "beige": ("beige",), "white": ("white",), "black": ("black",)}
_BACKGROUND_PHRASES = (" on a {} background", " on a {} background", " against a {} background", " on {}")
_RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_COUNT_WORDS = {2: "two", 3: "three"}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: Obj, rng: np.random.Generator | None, plural: bool = False) -> str:
    """'[size] colour shape', random synonyms and optional size when rng is given."""
    words = [obj.colour]
    if rng is not None and rng.random() < 0.5:
        words.insert(0, _pick(rng, _SIZE_WORDS[obj.size]))
    shape = _pick(rng, _SHAPE_WORDS[obj.shape]) if rng is not None else obj.shape
    words.append(_PLURAL.get(shape, shape + "s") if plural else shape)
    return " ".join(words)


def _describe(scene: Scene, rng: np.random.Generator | None) -> str:
    objs = scene.objects
    if scene.kind == "single":
        return _article(_noun(objs[0], rng))
    if scene.kind == "count":
        return f"{_COUNT_WORDS[len(objs)]} {_noun(objs[0], rng, plural=True)}"
    a, b, relation = objs[0], objs[1], scene.relation
    if rng is not None and rng.random() < 0.5:  # the same fact from the other object's side
        a, b, relation = b, a, INVERSE[relation]
    rel = _pick(rng, _RELATION_WORDS[relation]) if rng is not None else _RELATION_WORDS[relation][0]
    return f"{_article(_noun(a, rng))} {rel} {_article(_noun(b, rng))}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random true caption: optional prefix, the objects (with optional sizes, synonyms and
    either order for relations), and an optional background."""
    text = _pick(rng, _PREFIXES) + _describe(scene, rng)
    if rng.random() < 0.5:
        text += _pick(rng, _BACKGROUND_PHRASES).format(_pick(rng, _BACKGROUND_WORDS[scene.background]))
    return text


def prompt_for(scene: Scene) -> str:
    """The canonical evaluation prompt: 'a red circle', 'two red circles',
    'a red circle to the left of a blue square' (objects[0] relative to objects[1])."""
    return _describe(scene, None)


def vocabulary() -> list[str]:
    """Every word a caption or prompt can contain, sorted (to build a tokenizer)."""
    phrases = [*_PREFIXES, *_BACKGROUND_PHRASES, "a an", *COLOURS, *_COUNT_WORDS.values()]
    for group in (_SIZE_WORDS, _BACKGROUND_WORDS, _RELATION_WORDS, _SHAPE_WORDS):
        phrases += [w for words in group.values() for w in words]
    phrases += [_PLURAL.get(w, w + "s") for words in _SHAPE_WORDS.values() for w in words]
    return sorted({w for p in phrases for w in p.replace("{}", " ").split()})


# ---------------------------------------------------------------------------------------------
# Datasets

_SPLIT_IDS = {"train": 0, "heldout": 1}


def _rng(seed: int, split: str, i: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], i, stream])


class ShapesDataset:
    """`n` deterministic (image, caption, scene) triples; item i depends only on (seed, split, i)."""

    def __init__(self, n: int, seed: int = 0, size: int = 128, split: str = "train"):
        if split not in _SPLIT_IDS:
            raise UserError(f"split must be 'train' or 'heldout', got {split!r}")
        self.n, self.seed, self.size, self.split = n, seed, size, split

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, str, Scene]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = _rng(self.seed, self.split, i)
        scene = sample_scene(rng, self.split)
        return render(scene, self.size), caption(scene, rng), scene


def eval_prompts(n: int, seed: int = 0, split: str = "heldout") -> list[tuple[str, Scene]]:
    """`n` (canonical prompt, scene) pairs cycling through single, pair and count scenes, drawn from
    a random stream of their own (not ShapesDataset's items with the same seed)."""
    out = []
    for i in range(n):
        scene = sample_scene(_rng(seed, split, i, stream=1), split, kind=KINDS[i % len(KINDS)])
        out.append((prompt_for(scene), scene))
    return out


def write_folder(folder: Path, n: int, seed: int = 0, size: int = 128, split: str = "train") -> Path:
    """Write `n` renders as a training image folder (000123.png + 000123.txt caption), each file
    atomically; files already there are kept, so an interrupted call can simply be repeated."""
    from ..io.checkpoint import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(n, seed=seed, size=size, split=split)
    for i in range(n):
        png, txt = folder / f"{i:06d}.png", folder / f"{i:06d}.txt"
        if png.exists() and txt.exists():
            continue
        image, text, _ = data[i]
        with atomic_path(png) as tmp:
            image.save(tmp, format="PNG")
        with atomic_path(txt) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    return folder
