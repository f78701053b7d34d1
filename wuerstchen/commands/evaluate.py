"""Evaluate a model on the shapes world: generate from its prompts and read the images back.

    wuerstchen eval                              # the shipped model, 200 training-style + 200 held-out prompts
    wuerstchen eval --model runs/shapes/c/pipeline -n 300 --json eval.json --images-dir eval-images/

Prints, for training-style prompts (colour–shape pairs training shows) and held-out prompts (pairs
it never shows): colour, colour+shape, relation (pair prompts), count (count prompts) and exact
accuracy, as found by `wuerstchen.shapes.evaluate` (plain image analysis). The same figures for
real renders of the same prompts are printed beside them: the evaluator's own ceiling. Then the
reconstruction PSNR of Stage A (VQGAN) and Stage B (decoder from the semantic latent; needs the
model's semantic compressor) on renders of the held-out split.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserError
from .common import add_model_arguments, load_from_args

KEYS = ("colour_acc", "colour_shape_acc", "relation_acc", "count_acc", "exact_acc")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--num-prompts", type=int, default=200, help="prompts per split (cycling single/pair/count)")
    p.add_argument("--splits", nargs="+", choices=("train", "heldout"), default=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the images")
    p.add_argument("--prior-steps", type=int, default=None, help="default: the official 30-step schedule")
    p.add_argument("--prior-guidance", type=float, default=4.0)
    p.add_argument("--decoder-steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=20, help="images generated at once")
    p.add_argument("--recon-images", type=int, default=64, help="renders for the PSNR of Stage A and B (0: skip)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--images-dir", default=None, help="also save the generated images here")
    add_model_arguments(p)


def _check(args: argparse.Namespace) -> None:
    for name, low in (("num_prompts", 1), ("batch_size", 1), ("decoder_steps", 1), ("recon_images", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.prior_steps is not None and args.prior_steps < 1:
        raise UserError("--prior-steps must be at least 1")


class Progress:
    """Images done out of all, with the ETA: a tqdm bar on a terminal, else a plain line per batch
    on stderr (a log file gets no carriage returns)."""

    def __init__(self, total: int) -> None:
        import sys
        import time

        from tqdm import tqdm

        self.total, self.done, self.start, self.time = total, 0, time.perf_counter(), time.perf_counter
        self.bar = tqdm(total=total, desc="eval", unit="img") if sys.stderr.isatty() else None
        self.stderr = sys.stderr

    def update(self, n: int, what: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(n)
            return
        spent = self.time() - self.start
        eta = spent / self.done * (self.total - self.done)
        print(f"eval: {self.done}/{self.total} images ({what}), {spent:.0f} s, ETA {eta:.0f} s", file=self.stderr,
              flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate(pipe, prompts: list[str], args: argparse.Namespace, seed: int, progress: Progress | None = None) -> list:
    from ..sampling import DEFAULT_STAGE_C_TIMESTEPS
    from ..sampling import timesteps as even_timesteps

    times = DEFAULT_STAGE_C_TIMESTEPS if args.prior_steps is None else even_timesteps(args.prior_steps)
    size = pipe.settings.default_size
    images = []
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i : i + args.batch_size]
        images += pipe(
            batch, height=size, width=size, prior_timesteps=times,
            prior_guidance_scale=args.prior_guidance, num_inference_steps=args.decoder_steps, seed=seed + i,
        ).images  # fmt: skip
        if progress is not None:
            progress.update(len(batch), "generating")
    return images


def reconstruction_psnr(
    pipe, n: int, seed: int, steps: int, progress: Progress | None = None
) -> dict[str, float | None]:
    """Mean PSNR (dB) of Stage A's reconstruction (quantised) and of Stage B's decode of the semantic
    latent (the model's own compressor), on `n` renders of the held-out split; and how often Stage
    B's decode shows the render's objects (colour+shape, exact): the decoder's share of the errors,
    apart from the prior's."""
    import numpy as np
    import torch

    from ..pipeline import to_output
    from ..shapes import ShapesDataset
    from ..shapes.evaluate import evaluate, psnr

    size = pipe.settings.default_size
    data = ShapesDataset(n, seed=seed + 1, size=size, split="heldout")
    renders, captions, scenes = zip(*(data[i] for i in range(n)), strict=True)
    device = next(pipe.vqgan.parameters()).device
    dtype = next(pipe.vqgan.parameters()).dtype
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in renders])
    x = (x.float() / 255).to(device, dtype)
    out: dict[str, float | None] = {"stage_a_psnr": None, "stage_b_psnr": None}
    out |= {"stage_b_colour_shape_acc": None, "stage_b_exact_acc": None}
    with torch.no_grad():
        rec = torch.cat([pipe.vqgan(x[i : i + 16])[0] for i in range(0, n, 16)]).float().clamp(0, 1)
    out["stage_a_psnr"] = _mean_psnr(renders, to_output(rec, "pil"), psnr)
    if pipe.semantic is not None and pipe.decoder is not None:
        decoded = []
        for i in range(0, n, 16):
            with torch.no_grad():
                effnet = pipe.semantic.encode(x[i : i + 16], size=pipe.prior_latent_size(size, size))
            decoded += pipe.decode(
                effnet, prompt=list(captions[i : i + 16]), num_inference_steps=steps, seed=seed + i
            ).images
            if progress is not None:
                progress.update(len(effnet), "Stage B reconstructions")
        out["stage_b_psnr"] = _mean_psnr(renders, decoded, psnr)
        scores = evaluate(decoded, list(scenes))
        out["stage_b_colour_shape_acc"], out["stage_b_exact_acc"] = scores["colour_shape_acc"], scores["exact_acc"]
    return out


def _mean_psnr(a, b, psnr) -> float:
    values = [min(psnr(x, y), 100.0) for x, y in zip(a, b, strict=True)]
    return sum(values) / len(values)


def evaluate_model(pipe, args: argparse.Namespace) -> dict[str, Any]:
    from ..shapes import eval_prompts, render
    from ..shapes.evaluate import evaluate

    size = pipe.settings.default_size
    report: dict[str, Any] = {}
    recon = args.recon_images if pipe.semantic is not None and pipe.decoder is not None else 0
    progress = Progress(len(args.splits) * args.num_prompts + recon)
    for split in args.splits:
        pairs = eval_prompts(args.num_prompts, seed=args.seed, split=split)
        prompts = [p for p, _ in pairs]
        images = generate(pipe, prompts, args, args.seed, progress)
        if args.images_dir:
            folder = Path(args.images_dir) / split
            folder.mkdir(parents=True, exist_ok=True)
            for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
                image.save(folder / f"{i:04d}.png")
                (folder / f"{i:04d}.txt").write_text(prompt + "\n", encoding="utf-8")
        report[split] = {
            "model": evaluate(images, pairs),
            "real renders": evaluate([render(scene, size) for _, scene in pairs], pairs),
        }
    if args.recon_images:
        report["reconstruction"] = reconstruction_psnr(pipe, args.recon_images, args.seed, args.decoder_steps, progress)
    progress.close()
    return report


def _fmt(value: float | None) -> str:
    return "     –" if value is None else f"{100 * value:5.1f}%"


def print_report(report: dict[str, Any]) -> None:
    print(f"{'prompts':9} {'images':13} {'n':>4} " + " ".join(f"{k.removesuffix('_acc'):>12}" for k in KEYS))
    for split in ("train", "heldout"):
        for source, m in report.get(split, {}).items():
            print(f"{split:9} {source:13} {m['n']:4d} " + " ".join(f"{_fmt(m[k]):>12}" for k in KEYS))
        model = report.get(split, {}).get("model")
        if model and model.get("pair_colour_shape_acc") is not None:
            print(
                f"{split:9} two-object prompts: both objects drawn {_fmt(model['pair_colour_shape_acc'])}, of those"
                f" the first on the prompted side {_fmt(model['relation_when_drawn_acc'])} (chance about 25%)"
            )
    rec = report.get("reconstruction")
    if rec:
        parts = [f"Stage {s} {rec[f'stage_{s.lower()}_psnr']:.2f} dB" for s in "AB" if rec[f"stage_{s.lower()}_psnr"]]
        print("reconstruction PSNR on held-out renders: " + ", ".join(parts or ["–"]))
        if rec.get("stage_b_exact_acc") is not None:
            shape, exact = _fmt(rec["stage_b_colour_shape_acc"]), _fmt(rec["stage_b_exact_acc"])
            print(f"Stage B decoding the renders' own semantic latents: colour+shape {shape}, exact {exact}")
        if rec["stage_b_psnr"] is None:
            print("(no Stage B PSNR: the model folder has no semantic/ compressor)")


def run(args: argparse.Namespace) -> int:
    _check(args)
    pipe = load_from_args(args)
    report = evaluate_model(pipe, args)
    print_report(report)
    if args.json:
        from ..io.checkpoint import write_json

        write_json(report, args.json)
    return 0
