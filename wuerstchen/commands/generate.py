"""Generate images from text and write them as PNGs that carry their generation parameters.

    wuerstchen generate "a red circle above a blue square" -n 4 --seed 7
    wuerstchen generate --prompt-file prompts.txt --output-dir out/
    wuerstchen generate --from-png out/00000-7.png        # the same image again
    wuerstchen generate "a blue circle" --image in.png --strength 0.6   # image-to-image
    wuerstchen generate "a yellow star" --image in.png --mask mask.png  # inpainting (white = repaint)
    wuerstchen generate --variations in.png -n 4

Image i of a run gets the seed `seed + i`; its PNG records that seed (and the dtype), so
`--from-png` regenerates each image alone. File numbers continue after the highest one already in
the output folder, so a second run never replaces the first run's images. The parameters are
stored as PNG text chunks: `parameters` in AUTOMATIC1111's format and `wuerstchen` as JSON (what
`--from-png` reads). An image made from an image records that image's hash (and the mask's) and
the strengths: `--from-png` repeats it when the same source is given again with `--image`.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import string
from pathlib import Path
from typing import Any

from ..errors import UserError
from .common import add_model_arguments, load_from_args


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
        "--prior-steps",
        type=int,
        default=None,
        help="Stage C steps (default: the model's: v2 the official 30-time schedule, Stable Cascade 20)",
    )
    p.add_argument(
        "--prior-shift",
        type=float,
        default=1.0,
        help="schedule shift of the Stage C steps (Stable Cascade's official sampler and ComfyUI use 2; 1: diffusers')",
    )
    p.add_argument("--prior-guidance", type=float, default=4.0, help="Stage C guidance scale (≤ 1: off)")
    p.add_argument("--decoder-steps", type=int, default=None, help="Stage B steps (default: the model's: 12, or 10)")
    p.add_argument("--decoder-guidance", type=float, default=0.0, help="Stage B guidance scale (≤ 1: off)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ddpm (reference) or ddim")
    p.add_argument("--image", help="start from this image (image-to-image; with --mask: inpainting)")
    p.add_argument(
        "--strength", type=float, default=None, help="share of the Stage C steps run from --image (default 0.6; 1: all)"
    )
    p.add_argument("--mask", help="inpainting mask for --image, of its size: white = repaint (L, 1 or RGB)")
    p.add_argument("--decoder-strength", type=float, default=None, help="the same for Stage B (default 1: all)")
    p.add_argument("--variations", metavar="IMAGE", help="variations of this image (the prompt is optional)")
    p.add_argument("--output-dir", default="outputs", help="folder for the PNGs")
    p.add_argument(
        "--pattern", default="{index:05d}-{seed}.png", help="file name pattern: {index}, {seed}, {prompt} (a slug)"
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars (they are off anyway when stderr is no terminal)"
    )
    add_model_arguments(p)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompt_file:
        from ..io.files import read_file

        try:
            text = read_file(args.prompt_file, MAX_PROMPT_FILE, "prompt file").decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{args.prompt_file}: not UTF-8 text; save the prompt file as UTF-8") from None
        lines = text.splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts and args.variations:
        return [""]
    if not prompts:
        raise UserError("give a prompt, --prompt-file or --from-png")
    return prompts


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "empty"


def _check_size(value: int | None, name: str, step: int, default: int) -> int:
    """The CLI refuses a size that is not a multiple of the model's step, as the HTTP API does
    (the Python API snaps it down with a warning)."""
    value = default if value is None else value
    if value < step:
        raise UserError(f"--{name} {value} is too small: this model needs at least {step} px (a multiple of {step})")
    if value % step:
        low = value - value % step
        raise UserError(f"--{name} {value} is not a multiple of {step} px: use {low} or {low + step}")
    return value


# Bytes of the VQGAN decoder's activations per output pixel and per unit of its embed_dim in float32,
# a floor: measured 1.08, 1.03, 1.01 at 1024², 2048², 4096² (tending to 1.0 as the size grows; official
# embed_dim 384; `python benchmarks/vqgan_memory.py`, docs/performance.md), 0.9 to stay below.
VQGAN_BYTES_PER_PIXEL_CHANNEL = 0.9


def _check_memory(pipe, height: int, width: int) -> None:
    """Refuse a size whose image cannot fit: the weights on the device plus a floor for the VQGAN's
    full-resolution activations (the largest of the three stages'), before any sampling."""
    from ..hardware import total_memory

    device = pipe.device
    total = total_memory(device)
    if total is None or pipe.vqgan is None:
        return
    params = [p for m in pipe.modules().values() for p in m.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params if p.device.type == device.type)
    element = next(pipe.vqgan.parameters()).element_size()
    activations = VQGAN_BYTES_PER_PIXEL_CHANNEL * element / 4 * height * width * pipe.vqgan.config.embed_dim
    if weights + activations > total:
        raise UserError(
            f"{width}×{height} px needs at least {(weights + activations) / 2**30:.1f} GiB on {device.type} "
            f"({activations / 2**30:.1f} GiB for the VQGAN's activations alone) and this machine has "
            f"{total / 2**30:.1f} GiB: ask for a smaller size"
        )


MAX_SIDE, MAX_STEPS, MAX_GUIDANCE = 8192, 1000, 100.0  # beyond these a job is a mistake, not a wish
MAX_INPUT_PIXELS = 4096 * 4096  # an --image/--mask/--variations file
MAX_INPUT_BYTES = 256 << 20  # the same file: 4096² RGBA uncompressed is 64 MiB, a PNG far less
MAX_PROMPT_FILE = 16 << 20  # a --prompt-file: ~100,000 prompts
PATTERN_FIELDS = frozenset({"index", "seed", "prompt"})  # what --pattern may name
JOB_FIELDS = ("prompt", "negative_prompt", "height", "width", "seed", "prior_timesteps", "prior_steps", "prior_shift",
              "prior_guidance", "decoder_steps", "decoder_guidance", "sampler", "image", "mask", "strength",
              "decoder_strength", "variations")  # fmt: skip


def _check_job(job: Any, source: str) -> dict:
    """One image's parameters (from the flags or a PNG's metadata) checked as the flags are: known
    fields of the right types within bounds, else one line naming the field."""
    if not isinstance(job, dict):
        raise UserError(f"{source}: the parameters must be a JSON object, got {type(job).__name__}")

    def number(name: str, low: float, high: float, integer: bool, optional: bool = False) -> None:
        value = job.get(name)
        if value is None and optional:
            return
        kinds = (int,) if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            what = "an integer" if integer else "a number"
            raise UserError(f"{source}: {name} must be {what} from {low:g} to {high:g}, got {value!r}")

    if not isinstance(job.get("prompt"), str) or not isinstance(job.get("negative_prompt") or "", str):
        raise UserError(f"{source}: prompt and negative_prompt must be text")
    number("height", 1, MAX_SIDE, True, optional=True)
    number("width", 1, MAX_SIDE, True, optional=True)
    number("seed", 0, 2**63 - 1, True)
    number("prior_steps", 1, MAX_STEPS, True, optional=True)
    number("prior_shift", 1e-3, 1e3, False, optional=True)
    number("prior_guidance", 0, MAX_GUIDANCE, False)
    number("decoder_steps", 1, MAX_STEPS, True, optional=True)
    number("decoder_guidance", 0, MAX_GUIDANCE, False)
    number("strength", 0, 1, False, optional=True)
    number("decoder_strength", 0, 1, False, optional=True)
    for name in ("image", "mask"):  # the source images' hashes (image_inputs.image_hash)
        if job.get(name) is not None and not (isinstance(job[name], str) and re.fullmatch(r"[0-9a-f]{16}", job[name])):
            raise UserError(f"{source}: {name} must be an image hash (16 hex digits), got {str(job[name])[:40]!r}")
    if job.get("mask") is not None and job.get("image") is None:
        raise UserError(f"{source}: a mask needs an image")
    if not isinstance(job.get("variations", False), bool):
        raise UserError(f"{source}: variations must be true or false")
    if job.get("sampler") not in ("ddpm", "ddim"):
        raise UserError(f"{source}: sampler must be ddpm or ddim, got {job.get('sampler')!r}")
    times = job.get("prior_timesteps")
    if times is not None:
        ok = isinstance(times, list) and 2 <= len(times) <= MAX_STEPS + 1
        ok = ok and all(isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t <= 1 for t in times)
        if not ok or any(a <= b for a, b in zip(times, times[1:], strict=False)):
            raise UserError(f"{source}: prior_timesteps must be 2 to {MAX_STEPS + 1} decreasing times in [0, 1]")
    job = {k: job.get(k) for k in JOB_FIELDS}
    job["variations"] = bool(job["variations"])
    return job


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The --image/--mask/--variations files, read and checked before the model loads."""
    from ..image_inputs import open_image
    from ..io.files import read_file

    if args.variations and (args.image or args.mask):
        raise UserError("--variations takes its image itself: drop --image/--mask (or drop --variations)")
    if args.mask and not args.image:
        raise UserError("--mask needs --image: the picture to repaint")
    for flag in ("strength", "decoder_strength"):
        if getattr(args, flag) is not None and not args.image and not args.variations:
            raise UserError(f"--{flag.replace('_', '-')} needs --image (or --variations)")
    out = {}
    for name, path in (("image", args.image or args.variations), ("mask", args.mask)):
        if path:
            data = read_file(path, MAX_INPUT_BYTES, name)
            out[name] = open_image(data, str(path), MAX_INPUT_PIXELS)
    return out


def _matching(saved: dict, inputs: dict[str, Any], source: str) -> None:
    """A PNG made from an image is remade from that image only: the given files' hashes must match."""
    from ..image_inputs import image_hash

    for name, flag, article in (("image", "--image", "an"), ("mask", "--mask", "a")):
        want, given = saved.get(name), inputs.get(name)
        if want is None and given is not None:
            raise UserError(f"{source} was not made from {article} {name}: drop {flag}")
        if want is not None and given is None:
            raise UserError(f"{source} was made from {article} {name} (hash {want}): pass it again with {flag}")
        if want is not None and image_hash(given) != want:
            raise UserError(f"{flag} is not the {name} {source} was made from (hash {image_hash(given)}, not {want})")


def _paths(args: argparse.Namespace, jobs: list[dict], out_dir: Path) -> list[Path]:
    """Every image's file, checked before the model loads: numbers continue after the folder's
    highest, and no existing file is replaced."""
    from ..io.png import next_index

    first = next_index(out_dir)
    use = "use the fields {index}, {seed}, {prompt}"
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(args.pattern) if field is not None}
    except ValueError as e:
        raise UserError(f"--pattern {args.pattern!r}: {e}; {use}") from None
    if odd := fields - PATTERN_FIELDS:  # no positional fields, attributes or items
        names = ", ".join(sorted(f"{{{f}}}" for f in odd))
        raise UserError(f"--pattern {args.pattern!r}: {names} is not a field; {use}")
    paths = []
    for i, job in enumerate(jobs):
        try:
            name = args.pattern.format(index=first + i, seed=job["seed"], prompt=_slug(job["prompt"]))
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"--pattern {args.pattern!r}: {e!r}; {use}") from None
        path = out_dir / name
        if path.parent != out_dir or path.suffix != ".png":
            raise UserError(f"--pattern {args.pattern!r} must name a .png file inside --output-dir")
        if path.exists() or path in paths:
            raise UserError(f"{path} exists: put {{index}} in --pattern (numbers continue after the folder's highest)")
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from ..assets import SHIPPED_MODEL_NAME
    from ..image_inputs import image_hash
    from ..parts import prior_times

    if args.from_png:
        from ..io.png import read_png_parameters

        saved = read_png_parameters(args.from_png)
        jobs = [_check_job(saved, str(args.from_png))]
        if args.variations:
            raise UserError("--from-png with a variations PNG: pass its source with --image, not --variations")
        inputs = _inputs(args)
        _matching(jobs[0], inputs, str(args.from_png))
        model = saved.get("model")
        if args.model is None and model not in (None, SHIPPED_MODEL_NAME):
            # A PNG never picks what to load or download: the user names the model.
            raise UserError(f"{args.from_png} was made with the model {str(model)[:200]!r}: pass --model with it")
        if args.dtype == "auto" and saved.get("dtype") in ("float32", "bfloat16"):
            args.dtype = saved["dtype"]  # the precision the image was made in: the same pixels again
    else:
        for name in ("num_images", "decoder_steps", "prior_steps"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not args.prior_shift > 0:
            raise UserError("--prior-shift must be > 0 (1: no shift)")
        seed = args.seed if args.seed is not None else random.randrange(2**31)
        inputs = _inputs(args)
        hashes = {name: image_hash(im) for name, im in inputs.items()}
        jobs = []
        for prompt in _prompts(args):
            for _ in range(args.num_images):
                jobs.append(
                    _check_job(
                        dict(
                            prompt=prompt,
                            negative_prompt=args.negative_prompt,
                            height=args.height,
                            width=args.width,
                            seed=seed + len(jobs),
                            prior_timesteps=None,  # the model's (known once it is loaded)
                            prior_steps=args.prior_steps,
                            prior_shift=args.prior_shift,
                            prior_guidance=args.prior_guidance,
                            decoder_steps=args.decoder_steps,
                            decoder_guidance=args.decoder_guidance,
                            sampler=args.sampler,
                            strength=args.strength,
                            decoder_strength=args.decoder_strength,
                            variations=bool(args.variations),
                            **hashes,
                        ),
                        "the command line",
                    )
                )
    out_dir = Path(args.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output-dir {out_dir}: {e.strerror}") from None
    paths = _paths(args, jobs, out_dir)

    from tqdm import tqdm

    from ..io.png import save_png

    pipe = load_from_args(args)
    bars: dict[str, tqdm] = {}

    def hook(stage: str, step: int, total: int, _latents) -> None:
        if args.quiet:
            return
        bar = bars.get(stage)
        if bar is None or bar.total != total or step == 1:
            if bar is not None:
                bar.close()
            # disable=None: no bars when stderr is not a terminal (logs, pipes), only the printed paths
            bar = bars[stage] = tqdm(total=total, desc=stage, leave=False, disable=None)
        bar.update(1)

    step, native = pipe.size_step, pipe.settings.default_size
    model_name = args.model if args.model is not None else SHIPPED_MODEL_NAME
    for job, path in zip(jobs, paths, strict=True):
        sized = "image" not in inputs or job["height"] is not None  # else the image's size, snapped
        height = _check_size(job["height"], "height", step, native) if sized else None
        width = _check_size(job["width"], "width", step, native) if sized or job["width"] is not None else None
        source = inputs.get("image")
        _check_memory(pipe, height or source.height, width or source.width)
        times = job["prior_timesteps"] or prior_times(pipe.prior_part, job["prior_steps"], job.get("prior_shift", 1))
        decoder_steps = job.get("decoder_steps") or pipe.prior_part.defaults["decoder_steps"]
        run = pipe.variations if job["variations"] else pipe
        given = {"image": inputs["image"]} if "image" in inputs else {}
        if "mask" in inputs:
            given["mask_image"] = inputs["mask"]
        for name in ("strength", "decoder_strength"):
            if job[name] is not None:
                given[name] = job[name]
        image = run(
            *([inputs["image"], 1] if job["variations"] else []),
            prompt=job["prompt"],
            negative_prompt=job["negative_prompt"],
            height=height,
            width=width,
            prior_timesteps=times,
            prior_guidance_scale=job["prior_guidance"],
            num_inference_steps=decoder_steps,
            decoder_guidance_scale=job["decoder_guidance"],
            seed=job["seed"],
            sampler=job["sampler"],
            step_hook=hook,
            **({k: v for k, v in given.items() if k != "image"} if job["variations"] else given),
        ).images[0]
        params = dict(
            job,
            height=image.height,
            width=image.width,
            prior_timesteps=times,
            decoder_steps=decoder_steps,
            model=str(model_name),
            dtype=args.resolved_dtype,
        )
        save_png(image, path, params)
        print(path, flush=True)
    for bar in bars.values():
        bar.close()
    return 0
