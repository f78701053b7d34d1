"""Benchmark our pipeline against diffusers' reference on the same weights (see wuerstchen.bench).

wuerstchen bench                     # medium config, 512×512, CPU
wuerstchen bench --paper             # also FLOPs per 1024² image: Würstchen v2 vs SDXL
wuerstchen bench --shipped --repeats 5   # the shipped small model: seconds per image, bf16 vs fp32
wuerstchen bench --cascade --decoder-steps 10   # Stable Cascade's medium config against diffusers'
"""

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="medium", help="model config: medium (default) or tiny")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--decoder-steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each implementation, alternating")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile rows (each compiles three stages first: minutes on a CPU)")  # fmt: skip
    p.add_argument("--no-openvino", dest="openvino", action="store_false",
                   help="skip the OpenVINO rows (diffusers' prior and decoder in OpenVINO, fp32 and NNCF int8; "
                        "they need pip install 'wuerstchen[bench]')")  # fmt: skip
    p.add_argument("--paper", action="store_true", help="also count FLOPs per 1024² image: Würstchen v2 vs SDXL")
    p.add_argument("--official", action="store_true", help="ours alone on the official-size config (use --size 1024)")
    p.add_argument("--dtype", default="bfloat16", help="with --official: bfloat16 (default) or float32")
    p.add_argument("--quantize", choices=("int8", "int8-weights"), default=None,
                   help="with --official or --shipped: this int8 mode (--shipped: against float32)")  # fmt: skip
    p.add_argument("--shipped", action="store_true", help="the shipped small model: s/image, bf16 vs fp32 PSNR")
    p.add_argument("--model", default=None, help="with --shipped: another model folder")
    p.add_argument("--images", type=int, default=24, help="with --shipped: prompts for the bf16 vs fp32 PSNR")
    p.add_argument(
        "--cascade",
        action="store_true",
        help="Stable Cascade's medium config against diffusers' (use --decoder-steps 10)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..bench import BenchOptions, main

    return main(BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)}))
