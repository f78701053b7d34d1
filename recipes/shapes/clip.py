"""A small CLIP trained contrastively on the shapes world; its text tower conditions both stages.

    # the shipped model's (the recipe's clip step): the vision tower reads the frozen semantic compressor
    python -m recipes.shapes.clip --out runs/shapes/clip --config semantic \
        --semantic runs/shapes/semantic/semantic --steps 1500 --twins 1 --bf16   # ~10 min on 2 CPU cores
    # a plain CLIP on 64 px pixels
    python -m recipes.shapes.clip --out runs/shapes-clip --steps 600

or from Python:

    from recipes.shapes.clip import train_clip
    metrics = train_clip("runs/shapes-clip", steps=600)

writes
    OUT/text_encoder/   a transformers CLIPTextModel: CLIPTextModel.from_pretrained(...)
    OUT/tokenizer/      the word-level tokenizer (tokenizer.py): AutoTokenizer.from_pretrained(...)
    OUT/clip/           the whole CLIPModel, the optimizer state (to resume) and metrics.json

The pipeline reads text_encoder/ and tokenizer/ exactly as it reads the official CLIP models.

Training data: ShapesDataset's `train` split, plus hard negatives. Random batches are told apart by
colour first; from 64 px pixels a ViT of this size learnt colour and hardly shape in 600 steps (the
text states of "a green triangle" and "a green cross": pooled cosine 0.999), and "left of" and
"right of", or which object is red, not at all. So beside a scene the batch may hold its twin, which
differs in one stated fact: one object's shape (every object's, in count scenes), the relation (the
positions mirrored), which object has which colour, or one object fewer. Twins are built from the
scene and captioned by the world's own `caption`, so every caption stays true. Besides the batch's
loss, each (scene, twin) pair has a loss of its own (`_twin_loss`): in the batch a twin is one
negative among dozens, and relations were not learnt from that alone. With config "semantic" the
vision tower does not see pixels but the frozen semantic compressor's 8 × 8 × 16 latent of a 128 px
render (compressor.py), one token per cell, as Würstchen's Stage C does, beside that latent times
each cell's column and row (`with_coordinates`); that latent already tells shapes apart, and the
text tower learns the shape words within a few hundred steps, the relation words within about a
thousand. The `heldout` split (colour–shape pairs training never shows) measures retrieval on
compositions the model has not seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from wuerstchen.shapes.world import HELDOUT_PAIRS, SHAPES, Scene, ShapesDataset, caption, render, sample_scene

from .tokenizer import build_tokenizer


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    width: int  # text tower: its last_hidden_state is (B, 77, width)
    layers: int
    heads: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    projection_dim: int
    image_size: int = 64  # the vision tower's input side: pixels, or semantic latent cells
    patch_size: int = 8
    channels: int = 3  # 3: RGB; 16: the frozen semantic compressor's latent (see `vision_input`)
    # The input also carries itself times x and times y (3 × channels in all, see `with_coordinates`).
    coordinates: bool = False


# Text tower 0.8 M parameters (3.2 MB in float32); the vision tower about the same.
_SMALL = ClipConfig(width=128, layers=4, heads=4, vision_width=128, vision_layers=4, vision_heads=4, projection_dim=128)
_TEST = ClipConfig(width=32, layers=1, heads=2, vision_width=32, vision_layers=1, vision_heads=2, projection_dim=32)
# The vision tower reads the frozen semantic compressor's 8 × 8 × 16 latent of a 128 px render, one token
# per cell: that latent already tells shapes apart, so the contrastive loss teaches the text tower shape
# words too (from pixels, 600 steps taught it colour only).
# With the latent times x and times y beside it, a cell's content and place enter the tower as one
# linear feature, which relations ("left of") need: supervised on the relation of two objects, the
# tower was right on 77 % of a batch at step 150 with them and on 33 % without (chance 25 %).
_LATENT = dict(image_size=8, patch_size=1, channels=16, coordinates=True)
CONFIGS: dict[str, ClipConfig] = {
    "small": _SMALL,
    "semantic": dataclasses.replace(_SMALL, **_LATENT),
    "test": _TEST,
    "test-semantic": dataclasses.replace(_TEST, **_LATENT),
}
SEMANTIC_RENDER_SIZE = 128  # the side the semantic compressor is trained on (compressor.py)


def build_clip(config: ClipConfig, tokenizer, seed: int = 0) -> CLIPModel:
    """A randomly initialised CLIPModel whose text tower matches `tokenizer` (ids, 77 positions)."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.width,
        intermediate_size=4 * config.width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=tokenizer.model_max_length,
        # transformers pools the text at the first `eos_token_id` (or, only when it is 2, at the argmax
        # of the ids): our EOS is not 2 and is the largest id, so either rule finds it.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.channels * (3 if config.coordinates else 1),
        hidden_size=config.vision_width,
        intermediate_size=4 * config.vision_width,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
    )
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim))


def with_coordinates(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, 3C, H, W): x, x·u and x·v, with u and v each pixel's (or cell's) column
    and row in [-1, 1]."""
    h, w = x.shape[-2:]
    v, u = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.cat([x, x * u.to(x), x * v.to(x)], dim=1)


def image_tensor(images: list[Image.Image]) -> Tensor:
    """RGB images → (B, 3, H, W) in [-1, 1] (no CLIP mean/std: the tower is trained from scratch on
    these images only)."""
    rgb = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    return rgb.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vision_input(model: CLIPModel, images: list[Image.Image], semantic: nn.Module | None = None) -> Tensor:
    """What the vision tower reads: `image_tensor` of the images, or, with a frozen `semantic`
    compressor, its latent of them (B, 16, side, side), side = the tower's image_size; then
    `with_coordinates` of that where the tower reads three times its channels."""
    if semantic is None:
        x = image_tensor(images)
    else:
        side = model.config.vision_config.image_size
        pixels = (image_tensor(images) + 1) / 2  # the compressor takes [0, 1]
        with torch.no_grad():
            x = semantic.encode(pixels, size=(side, side)).float()
    return with_coordinates(x) if model.config.vision_config.num_channels == 3 * x.shape[1] else x


def load_compressor(folder: str | Path) -> nn.Module:
    """A saved SemanticCompressor, frozen, for `vision_input`."""
    from wuerstchen.io.checkpoint import load_model
    from wuerstchen.models.semantic import SemanticCompressor

    return load_model(SemanticCompressor, folder).eval().requires_grad_(False)


def render_size(model: CLIPModel, semantic: nn.Module | None = None) -> int:
    """The side scenes are rendered at for `vision_input`."""
    return SEMANTIC_RENDER_SIZE if semantic is not None else model.config.vision_config.image_size


# ---------------------------------------------------------------------------------------------
# Data


def twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """A scene that differs from `scene` in exactly one stated fact (None where none can be made).

    single: the object's shape changed; pair: the relation flipped (positions mirrored along the
    relation's axis), the two objects' colours swapped (their shapes, if the colours are equal), or one
    object's shape changed; count: one object removed (of three) or every object's shape changed.
    Never creates a HELDOUT_PAIRS pair the scene lacks, so twins of `train` scenes stay in `train`.
    """
    objs = scene.objects
    held = any(o.pair in HELDOUT_PAIRS for o in objs)

    def reshaped(which: tuple[int, ...]) -> Scene | None:
        shapes = [s for s in SHAPES if s != objs[which[0]].shape]
        shapes = [s for s in shapes if held or (objs[which[0]].colour, s) not in HELDOUT_PAIRS]
        if not shapes:
            return None
        shape = shapes[int(rng.integers(len(shapes)))]
        new = tuple(dataclasses.replace(o, shape=shape) if i in which else o for i, o in enumerate(objs))
        return dataclasses.replace(scene, objects=new)

    if scene.kind == "single":
        return reshaped((0,))
    if scene.kind == "count":
        if len(objs) == 3 and rng.random() < 0.5:
            drop = int(rng.integers(3))
            return dataclasses.replace(scene, objects=tuple(o for i, o in enumerate(objs) if i != drop))
        return reshaped(tuple(range(len(objs))))
    a, b = objs
    choice = rng.random()
    if choice < 1 / 3:
        if (other := reshaped((int(rng.integers(2)),))) is not None and other.kind == "pair":
            return other
    elif choice < 2 / 3:
        if a.colour != b.colour:
            a2, b2 = dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)
        else:
            a2, b2 = dataclasses.replace(a, shape=b.shape), dataclasses.replace(b, shape=a.shape)
        if held or not any(o.pair in HELDOUT_PAIRS for o in (a2, b2)):
            return dataclasses.replace(scene, objects=(a2, b2))
    # Mirroring keeps every box on the canvas and apart, and the relation unambiguous.
    if scene.relation in ("left of", "right of"):
        return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, cx=1 - o.cx) for o in objs))
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, cy=1 - o.cy) for o in objs))


def _scene_and_twin(
    rng: np.random.Generator, split: str, size: int, twins: float
) -> list[tuple[Image.Image, str, Scene]]:
    """One random scene of `split` as (image, caption, scene), and with probability `twins` its twin.

    The twin's caption replays the random choices of the original's (prefix, word order, synonyms,
    background phrase), so the two captions differ only in the words of the fact that differs, the
    clearest signal of what "left of" or "red square" means."""
    scene = sample_scene(rng, split)
    state = rng.bit_generator.state
    items = [(render(scene, size), caption(scene, rng), scene)]
    if rng.random() < twins and (other := twin(scene, rng)) is not None:
        rng.bit_generator.state = state
        items.append((render(other, size), caption(other, rng), other))
    return items


def training_batch(
    step: int, batch_size: int, seed: int = 0, size: int = 64, twins: float = 0.5
) -> tuple[list[Image.Image], list[str], list[tuple[int, int]]]:
    """The (images, captions) of one step, from `train` scenes and their twins, and the batch indices
    (scene, twin) of each twin that made it into the batch; a function of (seed, step) only, so a
    resumed run sees the same batches."""
    images: list[Image.Image] = []
    captions: list[str] = []
    pairs: list[tuple[int, int]] = []
    k = 0
    while len(images) < batch_size:
        items = _scene_and_twin(np.random.default_rng([seed, step, k]), "train", size, twins)
        if len(items) == 2 and len(images) + 2 <= batch_size:
            pairs.append((len(images), len(images) + 1))
        for image, text, _ in items:
            if len(images) < batch_size:
                images.append(image)
                captions.append(text)
        k += 1
    return images, captions, pairs


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def _embed(
    model: CLIPModel, tokenizer, images: list[Image.Image], captions: list[str], semantic: nn.Module | None = None
) -> tuple[Tensor, Tensor]:
    """Unit-norm (image, text) embeddings, each (B, projection_dim). Captions are padded to the
    longest in the batch: the text tower is causal, so real tokens (and the EOS that is pooled)
    come out exactly as with padding to 77, at a quarter of the cost."""
    tok = tokenizer(captions, padding="longest", truncation=True, return_tensors="pt")
    text = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    image = model.get_image_features(pixel_values=vision_input(model, images, semantic)).pooler_output
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def _symmetric_loss(model: CLIPModel, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """CLIP's symmetric InfoNCE loss over each group of n images and their n captions, (..., n, D)
    each, and the logits (..., n texts, n images)."""
    logits = model.logit_scale.exp().clamp(max=100) * text @ image.transpose(-1, -2)
    n = logits.shape[-1]
    target = torch.arange(n).expand(logits.shape[:-1]).reshape(-1)
    text_to_image, image_to_text = logits.reshape(-1, n), logits.transpose(-1, -2).reshape(-1, n)
    return (F.cross_entropy(text_to_image, target) + F.cross_entropy(image_to_text, target)) / 2, logits


def _contrastive(model: CLIPModel, image: Tensor, text: Tensor) -> tuple[Tensor, float]:
    """CLIP's symmetric InfoNCE loss over the batch and its text→image top-1 accuracy."""
    loss, logits = _symmetric_loss(model, image, text)
    return loss, (logits.argmax(1) == torch.arange(len(text))).float().mean().item()


def _twin_loss(model: CLIPModel, image: Tensor, text: Tensor, pairs: list[tuple[int, int]]) -> Tensor:
    """The contrastive loss within each (scene, twin) pair alone: its caption against the twin's
    image, its image against the twin's caption. In the whole batch a twin is one negative among
    dozens that colour alone tells apart; on its own it is the whole signal. Without it the tower
    learnt no relation words (twin accuracy at chance after 400 steps of pair scenes); with it,
    91 % in 200."""
    if not pairs:
        return image.new_zeros(())
    index = torch.tensor(pairs)  # (P, 2)
    return _symmetric_loss(model, image[index], text[index])[0]


@torch.no_grad()
def retrieval_accuracy(
    model: CLIPModel,
    tokenizer,
    split: str = "heldout",
    batches: int = 8,
    batch_size: int = 64,
    seed: int = 1,
    semantic: nn.Module | None = None,
) -> dict[str, float]:
    """Top-1 text→image and image→text accuracy within batches of ShapesDataset(`split`) (chance 1/B).

    Captions that are true for more than one image of a batch ("a red circle") count as misses,
    so 100 % is not always reachable."""
    model.eval()
    data = ShapesDataset(batches * batch_size, seed=seed, size=render_size(model, semantic), split=split)
    t2i = i2t = 0.0
    for b in range(batches):
        items = [data[b * batch_size + k] for k in range(batch_size)]
        image, text = _embed(model, tokenizer, [it[0] for it in items], [it[1] for it in items], semantic)
        sim = text @ image.T
        target = torch.arange(batch_size)
        t2i += (sim.argmax(1) == target).float().mean().item() / batches
        i2t += (sim.argmax(0) == target).float().mean().item() / batches
    return {"text_to_image": t2i, "image_to_text": i2t}


@torch.no_grad()
def twin_accuracy(
    model: CLIPModel, tokenizer, split: str = "heldout", n: int = 256, seed: int = 1, semantic: nn.Module | None = None
) -> dict[str, float]:
    """2-way accuracy (chance 0.5) on `n` scenes and their twins (`twin`): text_to_image, a caption
    scores its image above the twin's; image_to_text, an image scores its caption above the twin's
    caption (which differs only in those words). Also each by the kind of change (`twin_kind`), as
    "<kind>/text_to_image" and "<kind>/image_to_text"."""
    model.eval()
    size = render_size(model, semantic)
    pairs = []
    for i in range(20 * n):
        if len(pairs) == n:
            break
        if len(items := _scene_and_twin(np.random.default_rng([seed, 10**6 + i]), split, size, 1.0)) == 2:
            pairs.append(items)
    image, text = _embed(model, tokenizer, [p[0][0] for p in pairs], [p[0][1] for p in pairs], semantic)
    other_image, other_text = _embed(model, tokenizer, [p[1][0] for p in pairs], [p[1][1] for p in pairs], semantic)
    own = (text * image).sum(-1)
    t2i = (own > (text * other_image).sum(-1)).float()
    i2t = (own > (other_text * image).sum(-1)).float()
    out = {"text_to_image": t2i.mean().item(), "image_to_text": i2t.mean().item()}
    kinds = [twin_kind(p[0][2], p[1][2]) for p in pairs]
    for kind in sorted(set(kinds)):
        mask = torch.tensor([k == kind for k in kinds])
        out[f"{kind}/text_to_image"] = t2i[mask].mean().item()
        out[f"{kind}/image_to_text"] = i2t[mask].mean().item()
    return out


def twin_kind(scene: Scene, other: Scene) -> str:
    """What `twin` changed: "count", "relation", "binding" (a pair's colours or shapes swapped) or
    "shape" (one object's, or every object's in a count scene)."""
    if len(other.objects) != len(scene.objects):
        return "count"
    if other.relation != scene.relation:
        return "relation"
    changed = sum(o != p for o, p in zip(scene.objects, other.objects, strict=True))
    return "binding" if scene.kind == "pair" and changed == 2 else "shape"


@torch.no_grad()
def compare_prompts(text_encoder: CLIPTextModel, tokenizer, a: str, b: str) -> dict[str, float]:
    """Cosine similarities of two prompts' text-encoder outputs, as the pipeline computes them
    (padding to 77): of the pooled (EOS) states, of the whole last_hidden_state (77 × width,
    flattened), and the lowest over token positions."""
    tok = tokenizer(
        [a, b], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    out = text_encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    pooled = F.cosine_similarity(out.pooler_output[0], out.pooler_output[1], dim=0)
    states = out.last_hidden_state
    whole = F.cosine_similarity(states[0].flatten(), states[1].flatten(), dim=0)
    per_token = F.cosine_similarity(states[0], states[1], dim=-1)  # (77,)
    return {"pooled": pooled.item(), "last_hidden_state": whole.item(), "least_token": per_token.min().item()}


def _decays(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay on matrices only, not on norms, biases, embeddings or the temperature (as CLIP)."""
    return p.ndim >= 2 and "embedding" not in name


def train_clip(
    out_dir: str | Path,
    steps: int = 600,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    warmup: int = 50,
    weight_decay: float = 0.1,
    config: str | ClipConfig = "small",
    twins: float = 0.5,
    twin_weight: float = 1.0,
    bf16: bool = False,
    resume: bool = False,
    semantic: str | Path | None = None,
    log_every: int = 25,
    eval_every: int = 200,
    eval_scenes: int = 256,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train the shapes CLIP and write out_dir/{text_encoder,tokenizer,clip}; returns the final metrics.

    Deterministic from `seed` (model init and every batch). AdamW with linear warm-up then cosine
    decay to 0. `bf16` runs the forward passes under CPU bf16 autocast (faster where the CPU has
    AVX512-BF16 or AMX). `resume` continues from out_dir/clip/ if a run stopped early. `semantic`, a
    saved SemanticCompressor folder, is what a config with 16 channels sees images through (frozen).
    `twin_weight` weighs `_twin_loss` (0: the batch's loss alone).
    """
    out_dir = Path(out_dir)
    cfg = CONFIGS[config] if isinstance(config, str) else config
    compressor = None
    if semantic is not None:
        compressor = load_compressor(semantic)
        if compressor.config.c_out != cfg.channels:
            raise ValueError(
                f"{semantic}: its latent has {compressor.config.c_out} channels, the CLIP config's vision tower"
                f" reads {cfg.channels}: use a config made for the compressor (e.g. 'semantic')"
            )
    elif cfg.channels != 3:
        raise ValueError(f"a CLIP config with {cfg.channels} input channels reads a semantic latent: pass `semantic`")
    tokenizer = build_tokenizer()
    state_file = out_dir / "clip" / "train_state.pt"
    resuming = resume and state_file.exists()
    model = CLIPModel.from_pretrained(out_dir / "clip") if resuming else build_clip(cfg, tokenizer, seed)
    decay = [p for n, p in model.named_parameters() if _decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not _decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    start = 0
    if resuming:
        state = torch.load(state_file, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"resuming at step {start}")
    # The schedule is a function of the step alone, so a resumed run continues it where it stopped.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: schedule(start + i))

    size = render_size(model, compressor)
    metrics: dict[str, float] = {}
    train_seconds, since_log, clock = 0.0, 0, time.perf_counter()
    for step in range(start, steps):
        model.train()
        images, captions, pairs = training_batch(step, batch_size, seed, size, twins)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            image, text = _embed(model, tokenizer, images, captions, compressor)
        loss, acc = _contrastive(model, image, text)
        if twin_weight:
            loss = loss + twin_weight * _twin_loss(model, image, text, pairs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        since_log += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - clock
            train_seconds += elapsed
            speed = elapsed / since_log
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  batch acc {acc:.2f}  {speed:.2f} s/step")
            since_log, clock = 0, time.perf_counter()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            train_seconds += time.perf_counter() - clock
            metrics = _evaluate(model, tokenizer, compressor, eval_scenes)
            metrics.update(loss=loss.item(), steps=step + 1, train_seconds=round(train_seconds, 1))
            log("  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("heldout", "train_"))))
            _save(model, opt, step + 1, metrics, out_dir)
            since_log, clock = 0, time.perf_counter()  # evaluation and saving are not training time
    return metrics


def _evaluate(model: CLIPModel, tokenizer, semantic: nn.Module | None = None, n: int = 256) -> dict[str, float]:
    """Retrieval in batches of 64 (or `n`) and twin accuracy, on `n` scenes of each split."""
    out = {}
    for split in ("heldout", "train"):  # the train split with another seed: unseen items
        batch = min(64, n)
        acc = retrieval_accuracy(model, tokenizer, split, n // batch, batch, seed=1, semantic=semantic)
        out[f"{split}_text_to_image"] = acc["text_to_image"]
        out[f"{split}_image_to_text"] = acc["image_to_text"]
        twins = twin_accuracy(model, tokenizer, split, n=n, seed=1, semantic=semantic)
        out[f"{split}_twins_text_to_image"] = twins["text_to_image"]
        out[f"{split}_twins_image_to_text"] = twins["image_to_text"]
    return out


def _save(model: CLIPModel, opt: torch.optim.Optimizer, step: int, metrics: dict, out_dir: Path) -> None:
    """Write clip/, text_encoder/ and tokenizer/ into a temporary folder, then swap each into place,
    so a crash while saving leaves the previous save (or none), never a half-written one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", dir=out_dir))
    try:
        model.save_pretrained(tmp / "clip")
        torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "clip" / "train_state.pt")
        (tmp / "clip" / "metrics.json").write_text(json.dumps(metrics, indent=2))
        # The text tower alone, as the CLIPTextModel the pipeline loads; pooling needs its
        # eos_token_id, which the text sub-config carries.
        model.text_model.save_pretrained(tmp / "text_encoder")
        # A fresh one: the fast tokenizer used in training keeps its last call's padding and
        # truncation in tokenizer.json.
        build_tokenizer().save_pretrained(tmp / "tokenizer")
        for name in ("clip", "text_encoder", "tokenizer"):
            final, old = out_dir / name, out_dir / f".{name}.old"
            if final.exists():
                final.rename(old)
            (tmp / name).rename(final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m recipes.shapes.clip", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (text_encoder/, tokenizer/, clip/)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--twins", type=float, default=0.5, help="probability of adding a hard-negative twin")
    p.add_argument("--twin-weight", type=float, default=1.0, help="weight of the loss within each scene-twin pair")
    p.add_argument("--bf16", action="store_true", help="CPU bf16 autocast")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--semantic", type=Path, help="SemanticCompressor folder the vision tower sees images through")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared machine)")
    p.add_argument("--evaluate", action="store_true", help="only evaluate OUT/clip (twin accuracy by kind)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        model = CLIPModel.from_pretrained(Path(args.out) / "clip").eval()
        compressor = load_compressor(args.semantic) if args.semantic is not None else None
        accuracy = twin_accuracy(model, build_tokenizer(), "heldout", n=400, seed=1, semantic=compressor)
        print("held-out twins (400): " + "  ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    else:
        train_clip(
            args.out, args.steps, args.batch_size, args.seed, args.lr, args.warmup,
            config=args.config, twins=args.twins, twin_weight=args.twin_weight, bf16=args.bf16,
            resume=args.resume, semantic=args.semantic,
        )  # fmt: skip
    encoder = CLIPTextModel.from_pretrained(Path(args.out) / "text_encoder").eval()
    tokenizer = build_tokenizer()
    for a, b in (
        ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
        ("a red circle to the left of a blue square", "a blue circle to the left of a red square"),
        ("a small red circle", "a large red circle"),
        ("a green triangle", "a green cross"),
        ("a red circle", "a red star"),
        ("two green stars", "three green stars"),
    ):
        sims = compare_prompts(encoder, tokenizer, a, b)
        print(f"{a!r} vs {b!r}: " + "  ".join(f"{k} {v:.3f}" for k, v in sims.items()))


if __name__ == "__main__":
    main()
