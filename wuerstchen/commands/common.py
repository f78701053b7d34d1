"""Options shared by the commands that load a pipeline, declared once."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

# torch is imported inside the functions: building the parser (`--help`) should not pay for it.
if TYPE_CHECKING:
    import torch

    from ..pipeline import WuerstchenPipeline

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # fmt: skip


def parse_dtype(name: str) -> torch.dtype:
    import torch

    try:
        return getattr(torch, DTYPES[name.lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use float32 or bfloat16") from None


def shipped_model() -> Path:
    """The small model that ships inside the package (trained by our recipe)."""
    return Path(__file__).resolve().parent.parent / "assets" / "small"


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped small model)")
    g.add_argument("--prior", default=None, help="prior folder or hub id, when --model is a decoder-only folder")
    g.add_argument("--dtype", default="float32", help="float32 or bfloat16 (float16 overflows with Würstchen)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    g.add_argument(
        "--offload",
        choices=("none", "model", "sequential"),
        default="none",
        help="keep models on the CPU and move each (model) or each layer (sequential) to the device when used",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile prior, decoder and VQGAN (faster steps; the first image of a size compiles: tens of s)",
    )


def load_from_args(args: argparse.Namespace) -> WuerstchenPipeline:
    from ..pipeline import WuerstchenPipeline

    model = args.model
    if model is None:
        model = shipped_model()
        if not (model / "model_index.json").exists():
            raise FileNotFoundError(
                "no model given and the shipped small model is not installed: pass --model FOLDER_OR_HUB_ID "
                "(e.g. a folder made by `python scripts/make_random_model.py demo-model`)"
            )
    device = args.device or default_device()
    pipe = WuerstchenPipeline.from_pretrained(model, prior=args.prior, torch_dtype=parse_dtype(args.dtype))
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device)
    else:
        pipe.to(device)
    if args.compile:
        pipe.compile()
    return pipe
