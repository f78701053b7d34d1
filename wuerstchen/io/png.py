"""PNGs that carry their generation parameters, written whole and never over an earlier image.

Two text chunks: `parameters` in AUTOMATIC1111's format (what A1111, ComfyUI and image browsers
show) and `wuerstchen` as JSON (what `wuerstchen generate --from-png` reads back).
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import UserError
from .checkpoint import atomic_path
from .files import read_file

METADATA_KEY = "wuerstchen"
MAX_PNG_BYTES = 256 << 20  # a --from-png file, as an --image file may be

# A1111's numbering: a file whose name starts with digits and a separator ("00012-7.png").
_NUMBERED = re.compile(r"^(\d+)\D")


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The `wuerstchen` JSON chunk of a PNG, parsed (its fields are checked by the caller)."""
    data = read_file(path, MAX_PNG_BYTES, "PNG")
    try:
        with Image.open(io.BytesIO(data)) as im:
            text = getattr(im, "text", {}) or {}
    except MemoryError:
        raise
    except Exception as e:  # PIL raises several kinds for what is not an image
        raise UserError(f"{path} is not a PNG PIL can read ({type(e).__name__})") from None
    if METADATA_KEY not in text:
        raise UserError(f"{path} carries no wuerstchen parameters (was it written by `wuerstchen generate`?)")
    try:
        return json.loads(text[METADATA_KEY])
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: its wuerstchen parameters are not valid JSON ({type(e).__name__})") from None


def _one_line(text: str) -> str:
    """Control characters (newlines included) as spaces: in the `parameters` text a line break
    starts a field, so a prompt could otherwise forge `Negative prompt:` or `Steps:` lines. The
    `wuerstchen` JSON chunk keeps the prompt exactly."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)


def a1111_parameters(p: dict[str, Any]) -> str:
    """The `parameters` text A1111 and the tools around it read."""
    lines = [_one_line(p["prompt"])]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {_one_line(p['negative_prompt'])}")
    steps = len(p["prior_timesteps"]) - 1
    lines.append(
        f"Steps: {steps}, Sampler: {p['sampler']}, CFG scale: {p['prior_guidance']}, Seed: {p['seed']}, "
        f"Size: {p['width']}x{p['height']}, Model: {p['model']}, Decoder steps: {p['decoder_steps']}, "
        f"Decoder CFG scale: {p['decoder_guidance']}"
    )
    if p.get("image"):  # A1111's img2img fields (a strength not given is the call's default)
        lines[-1] += f", Denoising strength: {p['strength']}" if p.get("strength") is not None else ""
        lines[-1] += f", Init image hash: {p['image']}" + (f", Mask hash: {p['mask']}" if p.get("mask") else "")
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, params: dict[str, Any]) -> None:
    """Write `image` with `params` in its text chunks, atomically (a crash leaves no half file)."""
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text(METADATA_KEY, json.dumps(params))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def next_index(folder: Path) -> int:
    """One more than the highest number that starts a file name in `folder` (0 for none), so a new
    run's images follow the earlier runs' instead of replacing them (as AUTOMATIC1111 numbers)."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1
