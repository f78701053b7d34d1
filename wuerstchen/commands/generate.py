"""Generate images from text and write them as PNGs that carry their generation parameters.

    wuerstchen generate "a red circle above a blue square" -n 4 --seed 7
    wuerstchen generate --prompt-file prompts.txt --output-dir out/
    wuerstchen generate --from-png out/00000-7.png        # the same image again

Image i of a run gets the seed `seed + i`; its PNG records that seed, so `--from-png` regenerates
each image alone. The parameters are stored as PNG text chunks: `parameters` in AUTOMATIC1111's
format and `wuerstchen` as JSON (what `--from-png` reads).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from .common import add_model_arguments, load_from_args

METADATA_KEY = "wuerstchen"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="one or more prompts")
    p.add_argument("--prompt-file", help="a text file with one prompt per line")
    p.add_argument("--from-png", help="regenerate the image whose parameters this PNG carries")
    p.add_argument("--negative-prompt", default=None, help="what the image should not show")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random, printed)")
    p.add_argument(
        "--prior-steps", type=int, default=None, help="Stage C steps (default: the official 30-step schedule)"
    )
    p.add_argument("--prior-guidance", type=float, default=4.0, help="Stage C guidance scale (≤ 1: off)")
    p.add_argument("--decoder-steps", type=int, default=12, help="Stage B steps")
    p.add_argument("--decoder-guidance", type=float, default=0.0, help="Stage B guidance scale (≤ 1: off)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ddpm (reference) or ddim")
    p.add_argument("--output-dir", default="outputs", help="folder for the PNGs")
    p.add_argument(
        "--pattern", default="{index:05d}-{seed}.png", help="file name pattern: {index}, {seed}, {prompt} (a slug)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_arguments(p)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError("give a prompt, --prompt-file or --from-png")
    return prompts


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as im:
        text = getattr(im, "text", {}) or {}
    if METADATA_KEY not in text:
        raise ValueError(f"{path} carries no wuerstchen parameters (was it written by `wuerstchen generate`?)")
    return json.loads(text[METADATA_KEY])


def a1111_parameters(p: dict[str, Any]) -> str:
    """The `parameters` text A1111 and the tools around it read."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    steps = len(p["prior_timesteps"]) - 1
    lines.append(
        f"Steps: {steps}, Sampler: {p['sampler']}, CFG scale: {p['prior_guidance']}, Seed: {p['seed']}, "
        f"Size: {p['width']}x{p['height']}, Model: {p['model']}, Decoder steps: {p['decoder_steps']}, "
        f"Decoder CFG scale: {p['decoder_guidance']}"
    )
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, params: dict[str, Any]) -> None:
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text(METADATA_KEY, json.dumps(params))
    from ..io.checkpoint import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "empty"


def run(args: argparse.Namespace) -> int:
    from ..sampling import DEFAULT_STAGE_C_TIMESTEPS
    from ..sampling import timesteps as even_timesteps

    if args.from_png:
        saved = read_png_parameters(args.from_png)
        jobs = [saved]
        if args.model is None:
            args.model = saved.get("model")  # None: the shipped model
    else:
        for name in ("num_images", "decoder_steps"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        seed = args.seed if args.seed is not None else random.randrange(2**31)
        times = DEFAULT_STAGE_C_TIMESTEPS if args.prior_steps is None else None
        if args.prior_steps is not None and args.prior_steps < 1:
            raise ValueError("--prior-steps must be at least 1")
        jobs = []
        for prompt in _prompts(args):
            for _ in range(args.num_images):
                jobs.append(
                    dict(
                        prompt=prompt,
                        negative_prompt=args.negative_prompt,
                        height=args.height,
                        width=args.width,
                        seed=seed + len(jobs),
                        prior_timesteps=times,
                        prior_steps=args.prior_steps,
                        prior_guidance=args.prior_guidance,
                        decoder_steps=args.decoder_steps,
                        decoder_guidance=args.decoder_guidance,
                        sampler=args.sampler,
                    )
                )
    pipe = load_from_args(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bars: dict[str, tqdm] = {}

    def hook(stage: str, step: int, total: int, _latents) -> None:
        if args.quiet:
            return
        bar = bars.get(stage)
        if bar is None or bar.total != total or step == 1:
            if bar is not None:
                bar.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, leave=False)
        bar.update(1)

    for index, job in enumerate(jobs):
        height, width = pipe.check_size(job["height"], job["width"])
        times = job["prior_timesteps"] or even_timesteps(job["prior_steps"])
        image = pipe(
            job["prompt"],
            negative_prompt=job["negative_prompt"],
            height=height,
            width=width,
            prior_timesteps=times,
            prior_guidance_scale=job["prior_guidance"],
            num_inference_steps=job["decoder_steps"],
            decoder_guidance_scale=job["decoder_guidance"],
            seed=job["seed"],
            sampler=job["sampler"],
            step_hook=hook,
        ).images[0]
        params = dict(job, height=height, width=width, prior_timesteps=times, model=args.model)
        path = out_dir / args.pattern.format(index=index, seed=job["seed"], prompt=_slug(job["prompt"]))
        save_png(image, path, params)
        print(path)
    for bar in bars.values():
        bar.close()
    return 0
