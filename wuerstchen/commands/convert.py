"""Convert the original Würstchen checkpoint files to a diffusers-format folder.

    wuerstchen convert --stage-a vqgan_f4_v1_500k.pt --stage-b model_v2_stage_b.pt \
        --stage-c model_v2_stage_c.pt wuerstchen-v2/

The text encoders are CLIP models from the hub (or local folders): ViT-bigG/14 for the prior and
ViT-H/14 for the decoder, as the official v2 was trained.
"""

from __future__ import annotations

import argparse

from .common import parse_dtype

# The CLIP text towers the official stages were trained with (hub ids; tokenizer in the same repo).
OFFICIAL_PRIOR_TEXT = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
OFFICIAL_DECODER_TEXT = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="folder to write (combined diffusers layout)")
    p.add_argument("--stage-a", required=True, help="VQGAN checkpoint (vqgan_f4_v1_500k.pt)")
    p.add_argument("--stage-b", required=True, help="decoder checkpoint (model_v2_stage_b.pt)")
    p.add_argument("--stage-c", required=True, help="prior checkpoint (model_v2_stage_c*.pt)")
    p.add_argument("--prior-text-encoder", default=OFFICIAL_PRIOR_TEXT, help="CLIP folder or hub id for Stage C")
    p.add_argument("--text-encoder", default=OFFICIAL_DECODER_TEXT, help="CLIP folder or hub id for Stage B")
    p.add_argument("--preset", default="official-v2", help="architecture of the files (official-v2, tiny, ...)")
    p.add_argument("--dtype", default=None, help="store weights as float32 or bfloat16 (default: as in the files)")


def run(args: argparse.Namespace) -> int:
    from ..io.original import convert_original_files

    out = convert_original_files(
        args.output,
        stage_a=args.stage_a,
        stage_b=args.stage_b,
        stage_c=args.stage_c,
        prior_text_encoder=args.prior_text_encoder,
        text_encoder=args.text_encoder,
        preset=args.preset,
        dtype=parse_dtype(args.dtype) if args.dtype else None,
    )
    print(out)
    return 0
