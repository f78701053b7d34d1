"""The shipped model's semantic compressor, trained on the shapes world's labels and then frozen.

    python -m recipes.shapes.compressor --out runs/shapes/semantic --steps 1500

writes
    OUT/semantic/   the compressor (SemanticCompressor, "small" preset: 128 px → 8 × 8 × 16): what the
                    shapes CLIP sees images through, and the semantic latent Stage B and Stage C train on
    OUT/state.pt    the compressor, its label head and the optimizer (to resume); OUT/metrics.json

Würstchen's Stage C latent is the feature map of a frozen EfficientNetV2-S trained on ImageNet's labels:
it says *what* is where, not how each pixel looks. This is that network for this world. It is trained to
tell, from each of its 8 × 8 cells alone (a 1 × 1 head, so nothing is spread over neighbours): whether an
object's centre lies in the cell and that object's colour, shape, size and offset in the cell; the
background colour; and which colour covers each of the cell's 4 × 4 sub-blocks (the 32 × 32 silhouette map
of the VQGAN latent's side). Gaussian noise on the latent before the head makes these codes robust to
the small errors of the prior's samples. Trained jointly with the decoder's ε loss instead, the
compressor kept colour and place but drew every shape as a blob (issue #4: a linear probe read shape
45% from it, the decoder drew the right shape < 1/3 of the time from true latents).

Training scenes are the `train` split, rendered on the fly (the held-out colour–shape pairs stay unseen).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from wuerstchen.io.checkpoint import atomic_path, save_model, write_json
from wuerstchen.models.semantic import SEMANTIC_PRESETS, SemanticCompressor
from wuerstchen.shapes.world import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, ShapesDataset, draw_shape

SUB = 4  # sub-blocks per cell side in the silhouette map
NOISE = 0.2  # std of the noise on the latent before the head
_COLOURS, _BACKGROUNDS, _SIZES = list(COLOURS), list(BACKGROUNDS), list(SIZES)
# Per-cell outputs of the head, in order.
HEAD_PARTS = {
    "fine": SUB * SUB * (len(_COLOURS) + 1),  # each sub-block: 0 = background, 1 + k = colour k
    "centre": 1,
    "colour": len(_COLOURS),
    "shape": len(SHAPES),
    "size": len(_SIZES),
    "offset": 2,
    "background": len(_BACKGROUNDS),
}


def labels(scene: Scene, grid: int) -> dict[str, Tensor]:
    """A scene's targets on a `grid` × `grid` latent: per-cell maps (-100 where a cell has no object
    centre), the silhouette map at `SUB` × the grid's side, and the background class."""
    fine_side = grid * SUB
    fine = Image.new("L", (fine_side, fine_side), 0)
    draw = ImageDraw.Draw(fine)
    centre = torch.zeros(grid, grid)
    cls = {k: torch.full((grid, grid), -100, dtype=torch.long) for k in ("colour", "shape", "size")}
    offset = torch.zeros(2, grid, grid)
    for o in scene.objects:
        half = o.half * fine_side
        draw_shape(draw, o.shape, o.cx * fine_side, o.cy * fine_side, half, half, 1 + _COLOURS.index(o.colour))
        i, j = min(int(o.cy * grid), grid - 1), min(int(o.cx * grid), grid - 1)
        centre[i, j] = 1
        cls["colour"][i, j] = _COLOURS.index(o.colour)
        cls["shape"][i, j] = SHAPES.index(o.shape)
        cls["size"][i, j] = _SIZES.index(o.size)
        offset[:, i, j] = torch.tensor([o.cx * grid - j, o.cy * grid - i])
    return {
        "fine": torch.from_numpy(np.asarray(fine, dtype=np.int64)),
        "centre": centre,
        **cls,
        "offset": offset,
        "background": torch.tensor(_BACKGROUNDS.index(scene.background)),
    }


class LabelHead(nn.Module):
    """Per-cell (1 × 1) MLP: latent (B, c, g, g) → the logits of HEAD_PARTS, split into a dict."""

    def __init__(self, c_in: int = 16, c: int = 192) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c, 1), nn.GELU(), nn.Conv2d(c, c, 1), nn.GELU(), nn.Conv2d(c, sum(HEAD_PARTS.values()), 1)
        )  # fmt: skip

    def forward(self, latent: Tensor) -> dict[str, Tensor]:
        out = dict(zip(HEAD_PARTS, self.net(latent).split(list(HEAD_PARTS.values()), dim=1), strict=True))
        out["fine"] = F.pixel_shuffle(out["fine"], SUB)  # (B, classes, g·SUB, g·SUB)
        return out


def label_loss(out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
    """Sum of the parts' losses."""
    out = {k: v.float() for k, v in out.items()}
    losses = [
        F.cross_entropy(out["fine"], target["fine"]),
        F.binary_cross_entropy_with_logits(out["centre"][:, 0], target["centre"]),
        F.cross_entropy(out["background"].mean((2, 3)), target["background"]),
        *(F.cross_entropy(out[k], target[k], ignore_index=-100) for k in ("colour", "shape", "size")),
    ]
    has = target["colour"] >= 0
    losses.append((out["offset"].sigmoid() - target["offset"]).abs().sum(1)[has].mean())
    return sum(losses)


def accuracies(out: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, float]:
    """Per-part accuracies (colour, shape and size over the cells that hold an object's centre)."""
    has = target["colour"] >= 0
    metrics = {
        "fine_acc": float((out["fine"].argmax(1) == target["fine"]).float().mean()),
        "centre_acc": float(((out["centre"][:, 0] > 0) == (target["centre"] > 0)).float().mean()),
    }
    for k in ("colour", "shape", "size"):
        metrics[f"{k}_acc"] = float((out[k].argmax(1) == target[k])[has].float().mean())
    return metrics


def _batch(data: ShapesDataset, indices: range, grid: int) -> tuple[Tensor, dict[str, Tensor]]:
    images, targets = [], []
    for i in indices:
        image, _, scene = data[i]
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        targets.append(labels(scene, grid))
    x = torch.stack(images).float() / 255
    return x, {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


@torch.no_grad()
def evaluate(semantic: SemanticCompressor, head: LabelHead, n: int = 256, seed: int = 1) -> dict[str, float]:
    """Per-part accuracies on `n` renders of the held-out split (colour–shape pairs never trained on)."""
    semantic.eval()
    head.eval()
    x, target = _batch(ShapesDataset(n, seed=seed, size=128, split="heldout"), range(n), 8)
    metrics = accuracies(head(semantic.encode(x, size=(8, 8))), target)
    return {k: round(v, 4) for k, v in metrics.items()}


def train_compressor(
    out: Path,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    bf16: bool = True,
    device: str = "cpu",
) -> dict[str, float]:
    """Train (or resume) the compressor; write OUT/semantic; return held-out metrics."""
    out = Path(out)
    torch.manual_seed(seed)
    semantic = SemanticCompressor(SEMANTIC_PRESETS["small"]).to(device)
    head = LabelHead(semantic.config.c_out).to(device)
    params = [*semantic.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator(device).manual_seed(seed)  # the latent noise
    step = 0
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=device)
        semantic.load_state_dict(state["semantic"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        step = int(state["step"])
    warmup = min(100, steps // 10)

    def rate(s: int) -> float:  # linear warm-up, cosine decay to 10%
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    data = ShapesDataset(10**9, seed=seed + 7, size=128, split="train")
    t0 = time.perf_counter()
    semantic.train()
    head.train()
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr * rate(step)
        x, target = _batch(data, range(step * batch_size, (step + 1) * batch_size), 8)
        x, target = x.to(device), {k: v.to(device) for k, v in target.items()}
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            latent = semantic.encode(x, size=(8, 8))
            noise = torch.randn(latent.shape, generator=generator, device=device)
            noisy = latent + NOISE * noise.to(latent.dtype)
            logits = head(noisy)
            loss = label_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == steps:
            shown = " ".join(f"{k} {v:.3f}" for k, v in accuracies(logits, target).items())
            seconds = time.perf_counter() - t0
            print(f"compressor step {step}/{steps} loss {loss.item():.4f} {shown} ({seconds:.0f} s)", flush=True)
        if step % 500 == 0 or step == steps:
            out.mkdir(parents=True, exist_ok=True)
            state = {"semantic": semantic.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict()}
            with atomic_path(state_path) as tmp:
                torch.save(state | {"step": step, "generator": generator.get_state()}, tmp)
    semantic, head = semantic.cpu(), head.cpu()
    metrics = evaluate(semantic, head)
    save_model(semantic, out / "semantic")
    write_json(metrics | {"step": step}, out / "metrics.json")
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m recipes.shapes.compressor", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    metrics = train_compressor(args.out, args.steps, args.batch_size, args.lr, args.seed, args.bf16, args.device)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
