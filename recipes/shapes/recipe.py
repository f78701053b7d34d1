"""The recipe of the shipped small model: the shapes world → Stage A, compressor → CLIP → Stage B, C.

    python -m recipes.shapes.recipe --out runs/shapes                 # all steps; rerun to resume
    python -m recipes.shapes.recipe --out runs/shapes --ship wuerstchen/assets/small

The training steps are the project's own `wuerstchen train`; the recipe writes each one's options to
OUT/configs/{a,b,c}.json first, so a step can also be run (or resumed) by hand:

    wuerstchen train a --config runs/shapes/configs/a.json --resume

Steps, each skipped once done (a step that was cut off resumes from its newest checkpoint):
    data      OUT/data/: `--images` renders of the `train` split at 128 px, with captions (.txt);
              OUT/eval/: renders of the `heldout` split, for samples
    a, semantic
              OUT/a/: the VQGAN, f4: 128 px → 32 × 32 × 4; beside it OUT/semantic/: the semantic
              compressor (compressor.py; 128 px → 8 × 8 × 16), trained on the world's labels like
              Würstchen's ImageNet-trained EfficientNet, then frozen
    clip      OUT/clip/: the text encoder (clip.py), contrastive on the same world; its vision tower
              sees images through the frozen compressor
    parts     OUT/parts/: VQGAN (latent scale measured on the data) + compressor + text encoder, as a
              pipeline folder whose settings say how the stages of this model fit together
    c, b      OUT/c/: the prior, on a cache of text states and semantic latents; beside it OUT/b/:
              the decoder; both only need the frozen parts, not each other
    final     OUT/final/: the parts with the prior of c and the decoder of b: the model
    ship      copies OUT/final/ to --ship (float16 weights where float32 would pass 25 MB)

On a CPU the two steps of a phase (a + semantic, c + b) run side by side, one thread each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from wuerstchen.io.checkpoint import write_json

ROOT = Path(__file__).resolve().parents[2]  # the repository (recipes/ sits beside wuerstchen/)
SIZE = 128
# How the stages fit together (the pipeline's settings, model_index.json).
SETTINGS = {
    "resolution_multiple": 16.0,  # 128 px → an 8 × 8 Stage C latent
    "latent_dim_scale": 4.0,  # 8 × 8 → the 32 × 32 Stage B / VQGAN latent
    "latent_scale": 1.0,  # the prior's latent is the semantic latent itself
    "latent_shift": 0.0,
    "default_size": SIZE,
}
STAGE_A_MODEL = {"levels": 2, "embed_dim": 64, "bottleneck_blocks": 2, "num_vq_embeddings": 256, "scale_factor": 1.0}
# The decoder: patch size 1, so each level-0 token is one VQGAN latent pixel (patch 2 decoders, trained
# 8000 steps, drew blobs); the semantic latent is injected at the 16 × 16 and 8 × 8 levels.
STAGE_B_MODEL = {
    "c_r": 32,
    "c_cond": 128,
    "c_hidden": [64, 96, 192],
    "nhead": [-1, 4, 4],
    "blocks": [2, 2, 2],
    "level_config": ["CT", "CTA", "CTA"],
    "inject_effnet": [False, True, True],
    "clip_embd": 128,
    "dropout": 0.0,
    "patch_size": 1,
}
STAGE_C_MODEL = {"c_in": 16, "c": 192, "c_cond": 128, "c_r": 32, "depth": 6, "nhead": 4, "dropout": 0.0}

# Optimizer steps of each training step (`--{step}-steps`), and the `wuerstchen train` stage each runs
# (semantic is compressor.py's own loop). b and c run side by side and take about as long.
DEFAULT_STEPS = {"a": 1200, "semantic": 1500, "b": 5000, "c": 6000}
CLIP_STEPS = 2000
# Every CLIP training scene comes with its twin (one stated fact changed: a shape, the colours, the
# relation, the count), with a loss of its own per pair (clip.py `_twin_loss`): the hard negatives
# are what teach the text tower those words.
CLIP_TWINS = 1.0
TRAINS = {"a": "a", "b": "b", "c": "c"}

# bf16 autocast: 1.4-1.6× faster steps on this project's CPUs (AVX-512 BF16), and the GPU default anyway.
COMMON = {
    "image_size": SIZE, "num_workers": 0, "log_every": 25, "progress": False, "keep_checkpoints": 2, "bf16": True,
}  # fmt: skip


def stage_configs(out: Path, steps: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Each stage's `wuerstchen train` options."""
    data, ev = str(out / "data"), str(out / "eval")
    ema = {"ema_beta": 0.99, "ema_every": 1}
    return {
        "a": COMMON | {
            "data": data, "eval_data": ev, "holdout": 0, "model": STAGE_A_MODEL, "output_dir": str(out / "a"),
            "batch_size": 16, "lr": 1e-3, "warmup_steps": 50, "max_steps": steps["a"], "ema_beta": 0.0,
            "checkpoint_every": 250, "sample_every": 250, "settings": SETTINGS,
        },
        "b": COMMON | ema | {
            "data": data, "eval_data": ev, "pipeline": str(out / "parts"), "model": STAGE_B_MODEL,
            "output_dir": str(out / "b"), "batch_size": 16, "lr": 1e-3, "warmup_steps": 100, "max_steps": steps["b"],
            "ema_start": 0, "checkpoint_every": 250, "sample_every": 1000, "semantic_scale_min": 1.0,
            "caption_drop": 0.1,
            # Scale 1: the compressor sees the image at the 8 × 8 side Stage C makes (with U(0.75, 1)
            # and the side floored to the stride, it would see 6 × 6 and 7 × 7 only, never 8 × 8).
            # p2 gives low noise levels, where the edges are decided, little weight; the plain ε loss does not.
            "loss_weighting": "uniform",
        },
        "c": COMMON | ema | {
            "data": data, "eval_data": ev, "pipeline": str(out / "parts"), "model": STAGE_C_MODEL,
            "output_dir": str(out / "c"), "cache": str(out / "c-cache.safetensors"), "batch_size": 48,
            "lr": 5e-4, "warmup_steps": 100, "max_steps": steps["c"], "ema_start": min(2000, steps["c"] // 2),
            "checkpoint_every": 250, "sample_every": 1000, "caption_drop": 0.1, "sample_steps": 20,
        },
    }  # fmt: skip


# ----------------------------------------------------------------------------- steps


def _done(out: Path, step: str) -> bool:
    return (out / "done" / step).exists()


def _mark(out: Path, step: str, info: dict[str, Any]) -> None:
    write_json(info, out / "done" / step)


def render_data(out: Path, n_train: int, n_eval: int, seed: int, log: Callable[[str], None]) -> None:
    """Renders of the world as an image folder (000123.png + 000123.txt): the training code's input."""
    from wuerstchen.shapes.world import write_folder

    for name, split, n in (("data", "train", n_train), ("eval", "heldout", n_eval)):
        t0 = time.perf_counter()
        folder = write_folder(out / name, n, seed=seed, size=SIZE, split=split)
        log(f"data: {n} {split} images in {folder} ({time.perf_counter() - t0:.0f} s)")


def train_stage(out: Path, stage: str, options: dict[str, Any]) -> dict[str, Any]:
    from wuerstchen.train.config import build_config
    from wuerstchen.train.loop import train

    cfg = build_config(stage, options, source=str(out / "configs" / f"{stage}.json"))
    t0 = time.perf_counter()
    result = train(cfg, resume=True)
    return {"step": result.step, "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def make_parts(out: Path, log: Callable[[str], None]) -> None:
    """OUT/parts/: the VQGAN with its latent scale measured (so Stage B sees unit-variance latents),
    the frozen semantic compressor and the CLIP text tower for both stages, as a pipeline folder with
    this model's settings."""
    from transformers import AutoTokenizer, CLIPTextModel

    from wuerstchen.io.checkpoint import load_model
    from wuerstchen.models.semantic import SemanticCompressor
    from wuerstchen.models.stage_a import StageA
    from wuerstchen.pipeline import PipelineSettings, WuerstchenPipeline
    from wuerstchen.train.data import FolderDataset

    vqgan = load_model(StageA, out / "a" / "vqgan").eval()
    data = FolderDataset(out / "data", SIZE)
    images = torch.stack([data[i]["image"] for i in range(0, min(len(data), 2048), 8)])
    latents = torch.cat([vqgan.encode(images[i : i + 64]) for i in range(0, len(images), 64)])
    scale = float(latents.std())
    vqgan.config = dataclasses.replace(vqgan.config, scale_factor=round(scale, 4))
    log(f"parts: VQGAN latent std {scale:.4f} → scale_factor")
    encoder = CLIPTextModel.from_pretrained(out / "clip" / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "clip" / "tokenizer")
    pipe = WuerstchenPipeline(
        None, encoder, tokenizer, None, encoder, tokenizer, vqgan, settings=PipelineSettings(**SETTINGS)
    )
    pipe.semantic = load_model(SemanticCompressor, out / "semantic" / "semantic").eval()
    pipe.save_pretrained(out / "parts")


def ship(out: Path, dest: Path, limit_mb: float, log: Callable[[str], None]) -> None:
    """Copy the trained pipeline to `dest`; store float16 weights if float32 would exceed `limit_mb`."""
    from wuerstchen.pipeline import WuerstchenPipeline

    src = out / "final"
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) / 2**20
    if size <= limit_mb:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    else:
        WuerstchenPipeline.from_pretrained(src, torch_dtype=torch.float16).save_pretrained(dest)
    shipped = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2**20
    log(f"ship: {dest} ({shipped:.1f} MB; float32 was {size:.1f} MB)")


def assemble_final(out: Path, log: Callable[[str], None]) -> None:
    """OUT/final/: the frozen parts (OUT/parts) with the prior of OUT/c and the decoder of OUT/b."""
    from wuerstchen.io.checkpoint import load_model
    from wuerstchen.models.stage_b import StageB
    from wuerstchen.models.stage_c import StageC
    from wuerstchen.pipeline import WuerstchenPipeline

    pipe = WuerstchenPipeline.from_pretrained(out / "parts")
    pipe.prior = load_model(StageC, out / "c" / "prior")
    pipe.decoder = load_model(StageB, out / "b" / "decoder")
    pipe.save_pretrained(out / "final")
    log(f"final: {out / 'final'}")


def _side_command(out: Path, step: str, steps: dict[str, int], seed: int, device: str) -> list[str]:
    """The command that runs `step` in a process of its own."""
    if step == "semantic":
        return [sys.executable, "-m", "recipes.shapes.compressor", "--out", str(out / "semantic"), "--steps",
                str(steps["semantic"]), "--seed", str(seed), "--device", device]  # fmt: skip
    config = out / "configs" / f"{step}.json"
    return [sys.executable, "-m", "wuerstchen", "train", TRAINS[step], "--config", str(config), "--resume"]


def run(
    out: Path,
    n_images: int = 30_000,
    steps: dict[str, int] | None = None,
    clip_steps: int = CLIP_STEPS,
    device: str | None = None,
    seed: int = 0,
    ship_to: Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    steps = DEFAULT_STEPS | (steps or {})
    configs = stage_configs(out, steps)
    if device:
        configs = {k: v | {"device": device} for k, v in configs.items()}
    for stage, options in configs.items():
        write_json({"stage": TRAINS[stage], **options}, out / "configs" / f"{stage}.json")
    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    threads = torch.get_num_threads()
    clock = time.perf_counter()

    def step_here(step: str) -> None:
        if _done(out, step):
            return
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        if step == "data":
            render_data(out, n_images, 64, seed, log)
            info = {"images": n_images}
        elif step == "clip":
            from .clip import train_clip

            log(f"clip: {clip_steps} steps, seeing images through {out / 'semantic' / 'semantic'}")
            info = train_clip(
                out / "clip", clip_steps, seed=seed, config="semantic", twins=CLIP_TWINS, bf16=True, resume=True,
                semantic=out / "semantic" / "semantic", log=log,
            )  # fmt: skip
        elif step == "parts":
            make_parts(out, log)
        elif step == "final":
            assemble_final(out, log)
        else:
            log(f"{step}: wuerstchen train {step} --config {out / 'configs' / f'{step}.json'} --resume")
            info = train_stage(out, step, configs[step])
        _mark(out, step, info | {"seconds": round(time.perf_counter() - t0, 1)})
        log(f"{step}: done in {time.perf_counter() - t0:.0f} s")

    # Each phase is one step, or a step here and one beside it that needs nothing of the other. On a
    # CPU the two run side by side with one thread each: two small models at a time get more out of
    # 2 cores than two threads for one (about 1.3× here). On a GPU they run one after the other.
    phases = [("data", None), ("a", "semantic"), ("clip", None), ("parts", None), ("c", "b"), ("final", None)]
    for here, beside in phases:
        job = None
        if beside is not None and not _done(out, beside):
            cmd = _side_command(out, beside, steps, seed, "cpu" if on_cpu else (device or "cuda"))
            # The repository root on the path: the side step may be this folder's compressor trainer.
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONPATH": path, **({"OMP_NUM_THREADS": "1"} if on_cpu else {})}
            log(f"{beside}: " + " ".join(cmd[1:]))
            t0 = time.perf_counter()
            job = subprocess.Popen(cmd, env=env)
            if not on_cpu:
                _finish(out, beside, job, t0)
                job = None
        if job is not None:
            torch.set_num_threads(1)
        try:
            step_here(here)
        finally:
            torch.set_num_threads(threads)
        if job is not None:
            _finish(out, beside, job, t0)
    log(f"recipe: all steps done ({time.perf_counter() - clock:.0f} s this run)")
    if ship_to is not None:
        ship(out, ship_to, 25.0, log)


def _finish(out: Path, step: str, job: subprocess.Popen, t0: float) -> None:
    if job.wait() != 0:
        raise RuntimeError(f"step {step} failed (exit {job.returncode}); rerun the recipe to resume it")
    info = json.loads((out / "semantic" / "metrics.json").read_text()) if step == "semantic" else {}
    _mark(out, step, info | {"seconds": round(time.perf_counter() - t0, 1)})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m recipes.shapes.recipe", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run folder (data, stages, checkpoints)")
    p.add_argument("--images", type=int, default=30_000, help="training renders")
    p.add_argument("--clip-steps", type=int, default=CLIP_STEPS)
    for stage, default in DEFAULT_STEPS.items():
        p.add_argument(f"--{stage}-steps", type=int, default=default, help=f"optimizer steps of step {stage}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ship", type=Path, default=None, help="copy the finished model here (wuerstchen/assets/small)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    steps = {stage: getattr(args, f"{stage}_steps") for stage in DEFAULT_STEPS}
    run(args.out, args.images, steps, args.clip_steps, args.device, args.seed, args.ship)
    print(json.dumps({p.name: json.loads(p.read_text()) for p in sorted((args.out / "done").iterdir())}, indent=1))


if __name__ == "__main__":
    main()
