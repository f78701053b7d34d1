"""Options shared by the commands that load a pipeline, declared once."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import UserError

# torch is imported inside the functions: building the parser (`--help`) should not pay for it.
if TYPE_CHECKING:
    import torch

    from ..pipeline import WuerstchenPipeline


def parse_dtype(name: str, device: str | None = None) -> torch.dtype:
    """`--dtype` → a torch dtype for `device`; float16 is refused (it overflows with Würstchen)."""
    from ..hardware import FLOAT16_MESSAGE, resolve_dtype

    if name.lower() in ("float16", "fp16", "half"):
        raise UserError(f"--dtype {name}: {FLOAT16_MESSAGE}")
    try:
        return resolve_dtype(name, device)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def check_device(name: str) -> str:
    """`--device` checked before anything loads: a name torch knows, on a device this machine has."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device name: use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine (or this torch build) has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (0 is the first)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: only cpu, cuda and mps are supported")
    return name


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped small model)")
    g.add_argument("--prior", default=None, help="prior folder or hub id, when --model is a decoder-only folder")
    g.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 where the device computes it natively: CUDA, CPUs with AVX512_BF16 or AMX; "
        "else float32), float32 or bfloat16",
    )
    g.add_argument(
        "--lite", action="store_true", help="Stable Cascade: the lite prior and decoder (prior_lite/, decoder_lite/)"
    )
    g.add_argument("--variant", default=None, help="weight files of this variant, e.g. bf16 (…model.bf16.safetensors)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    g.add_argument(
        "--offload",
        choices=("none", "model", "sequential"),
        default="none",
        help="keep models on the CPU and move each (model) or each layer (sequential) to the device when used",
    )
    g.add_argument(
        "--quantize",
        choices=("int8", "int8-weights"),
        default=None,
        help="CPU: int8 weights and activations of prior, decoder and VQGAN (int8), or int8 weights only (less "
        "memory); see docs/performance.md",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile prior, decoder and VQGAN (faster steps; the first image of a size compiles: tens of s)",
    )


def load_from_args(args: argparse.Namespace) -> WuerstchenPipeline:
    from ..assets import shipped_model
    from ..hardware import default_device
    from ..pipeline import WuerstchenPipeline

    model = args.model
    if model is None:
        model = shipped_model()
        if not (model / "model_index.json").exists():
            raise UserError(
                "no model given and the shipped small model is not installed: pass --model FOLDER_OR_HUB_ID "
                "(e.g. a folder made by `python scripts/make_random_model.py random-model`)"
            )
    device = check_device(args.device) if args.device else str(default_device())
    dtype = parse_dtype(args.dtype, device)
    quantize = getattr(args, "quantize", None)
    if quantize is not None:
        from ..quant import check_device as check_quantize

        check_quantize(quantize, device)
    args.resolved_dtype = str(dtype).removeprefix("torch.")  # for the PNG metadata and the logs
    pipe = WuerstchenPipeline.from_pretrained(
        model,
        prior=args.prior,
        torch_dtype=dtype,
        lite=getattr(args, "lite", False),
        variant=getattr(args, "variant", None),
        quantize=quantize,
    )
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device)
    else:
        pipe.to(device)
    if args.compile:
        pipe.compile()
    return pipe
