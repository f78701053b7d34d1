"""Convert the original checkpoint files of Würstchen v2 or Stable Cascade to a pipeline folder.

    wuerstchen convert --stage-a vqgan_f4_v1_500k.pt --stage-b model_v2_stage_b.pt \
        --stage-c model_v2_stage_c.pt wuerstchen-v2/
    wuerstchen convert --stage-a stage_a.safetensors --stage-b stage_b_lite_bf16.safetensors \
        --stage-c stage_c_lite_bf16.safetensors --text-encoder models/stable-cascade/text_encoder \
        --previewer previewer.safetensors --effnet effnet_encoder.safetensors stable-cascade-lite/

v2 (`.pt` files): the text encoders are CLIP models from the hub (or local folders), ViT-bigG/14 for
the prior and ViT-H/14 for the decoder, as the official v2 was trained. Stable Cascade
(`.safetensors`: the official single files or ComfyUI's all-in-one checkpoints, told apart by their
keys, full or lite by their shapes): both stages read CLIP ViT-bigG/14 with projection, the
`text_encoder/` folder of stabilityai/stable-cascade; `--image-encoder` adds image variations.
"""

from __future__ import annotations

import argparse

from .common import parse_dtype

# The CLIP text towers the official v2 stages were trained with (hub ids; tokenizer in the same repo).
OFFICIAL_PRIOR_TEXT = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
OFFICIAL_DECODER_TEXT = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="folder to write (combined diffusers layout)")
    p.add_argument("--stage-a", required=True, help="VQGAN checkpoint (vqgan_f4_v1_500k.pt, stage_a.safetensors)")
    p.add_argument("--stage-b", required=True, help="decoder checkpoint (model_v2_stage_b.pt, stage_b*.safetensors)")
    p.add_argument("--stage-c", required=True, help="prior checkpoint (model_v2_stage_c*.pt, stage_c*.safetensors)")
    p.add_argument("--prior-text-encoder", default=OFFICIAL_PRIOR_TEXT, help="v2: CLIP folder or hub id for Stage C")
    p.add_argument(
        "--text-encoder",
        default=None,
        help=f"v2: CLIP folder or hub id for Stage B (default {OFFICIAL_DECODER_TEXT}); "
        "Stable Cascade: the CLIP-G text_encoder/ folder both stages read (required)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="Stable Cascade: tokenizer folder (default: beside the text encoder)"
    )
    p.add_argument(
        "--image-encoder", default=None, help="Stable Cascade: CLIP image_encoder/ folder (image variations)"
    )
    p.add_argument(
        "--previewer", default=None, help="Stable Cascade: previewer.safetensors (the UI's Stage C previews)"
    )
    p.add_argument(
        "--effnet", default=None, help="Stable Cascade: effnet_encoder.safetensors (image-to-image, inpainting)"
    )
    p.add_argument("--preset", default="official-v2", help="v2: architecture of the files (official-v2, tiny, ...)")
    p.add_argument("--dtype", default=None, help="store weights as float32 or bfloat16 (default: as in the files)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    dtype = parse_dtype(args.dtype) if args.dtype else None
    if str(args.stage_c).endswith(".safetensors"):
        from ..io.cascade_files import convert_cascade_files

        if args.text_encoder is None:
            raise UserError(
                "Stable Cascade files hold no text encoder: pass --text-encoder models/stable-cascade/text_encoder"
            )
        out = convert_cascade_files(
            args.output, args.stage_c, args.stage_b, args.stage_a, args.text_encoder, tokenizer=args.tokenizer,
            image_encoder=args.image_encoder, previewer=args.previewer, dtype=dtype, effnet=args.effnet,
        )  # fmt: skip
    else:
        from ..io.original import convert_original_files

        out = convert_original_files(
            args.output,
            stage_a=args.stage_a,
            stage_b=args.stage_b,
            stage_c=args.stage_c,
            prior_text_encoder=args.prior_text_encoder,
            text_encoder=args.text_encoder or OFFICIAL_DECODER_TEXT,
            preset=args.preset,
            dtype=dtype,
        )
    print(out)
    return 0
