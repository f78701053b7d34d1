"""Pipelines with random weights, built from the presets: for tests, benchmarks and the demo model
that works before any trained weights are at hand. Nothing is downloaded: the CLIP text towers
are built from a config, and the tokenizer is a character-level CLIP tokenizer."""

from __future__ import annotations

import math

import torch
from torch import nn

from .models.stage_a import STAGE_A_PRESETS, StageA
from .models.stage_b import STAGE_B_PRESETS, StageB
from .models.stage_c import STAGE_C_PRESETS, StageC
from .pipeline import PipelineSettings, WuerstchenPipeline


def char_tokenizer(max_length: int = 77):
    """A working CLIP tokenizer without a download: the 256 byte-level symbols, each also with the
    end-of-word suffix `</w>`, no merges, plus the start/end tokens (ids 512 and 513)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_text_model(seed: int, width: int = 32, layers: int = 2, heads: int = 2, projection: int | None = None):
    """A randomly initialised CLIP text tower over `char_tokenizer`'s 514 ids; with `projection`, a
    `CLIPTextModelWithProjection` (Stable Cascade's kind: its pooled embedding has that width)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        projection_dim=projection or width,
    )
    cls = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    return cls(config).eval().requires_grad_(False)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights at a scale that keeps activations O(1). The official initialisation zeroes
    the output heads, GRN and gammas, which would make every image the same; the heads are scaled
    down so the noise estimates ε = (x − a)/|1 − b| stay well conditioned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        head = getattr(model, "out", None) or getattr(model, "clf", None)
        if head is not None:
            head[1].weight.mul_(0.1)
    return model.eval().requires_grad_(False)


def random_semantic(seed: int, affine: bool = True) -> nn.Module:
    """The tiny semantic compressor (stride 32, 1/42.67 of the image side) with random weights;
    `affine=False`: Stable Cascade's mapper norm."""
    from dataclasses import replace

    from .models.semantic import SEMANTIC_PRESETS, SemanticCompressor

    return randomize(SemanticCompressor(replace(SEMANTIC_PRESETS["tiny"], mapper_affine=affine)), seed)


def random_pipeline(preset: str = "tiny", seed: int = 0, text_width: int | None = None,
                    semantic: bool = False) -> WuerstchenPipeline:  # fmt: skip
    """A whole pipeline of the named preset with random weights (seeded); `semantic`: with the
    tiny semantic compressor (image inputs)."""
    c, b, a = STAGE_C_PRESETS[preset], STAGE_B_PRESETS[preset], STAGE_A_PRESETS[preset]
    return WuerstchenPipeline(
        semantic=random_semantic(seed + 6) if semantic else None,
        prior=randomize(StageC(c), seed + 1),
        prior_text_encoder=clip_text_model(seed + 2, text_width or c.c_cond),
        prior_tokenizer=char_tokenizer(),
        decoder=randomize(StageB(b), seed + 3),
        text_encoder=clip_text_model(seed + 4, text_width or b.clip_embd),
        tokenizer=char_tokenizer(),
        vqgan=randomize(StageA(a), seed + 5),
        settings=PipelineSettings(default_size=128),
    )


def random_cascade_pipeline(preset: str = "tiny", seed: int = 0, semantic: bool = False) -> WuerstchenPipeline:
    """A Stable Cascade pipeline of the named U-Net presets (`tiny`: tiny-c/tiny-b, `medium`:
    medium-c/medium-b) with random weights: CLIP text towers with projection of the prior's widths
    (2 layers), the VQGAN of the same preset name, no image encoder; `semantic`: with the tiny
    semantic compressor in Stable Cascade's form (image inputs)."""
    from .models.cascade import CASCADE_PRESETS, CascadeUNet

    c, b = CASCADE_PRESETS[f"{preset}-c"], CASCADE_PRESETS[f"{preset}-b"]
    text = clip_text_model(seed + 2, c.clip_text_in_channels, projection=c.clip_text_pooled_in_channels)
    return WuerstchenPipeline(
        semantic=random_semantic(seed + 6, affine=False) if semantic else None,
        prior=randomize(CascadeUNet(c), seed + 1),
        prior_text_encoder=text,
        prior_tokenizer=char_tokenizer(),
        decoder=randomize(CascadeUNet(b), seed + 3),
        text_encoder=text,
        tokenizer=char_tokenizer(),
        vqgan=randomize(StageA(STAGE_A_PRESETS[preset]), seed + 5),
        settings=PipelineSettings(default_size=1024),
    )
