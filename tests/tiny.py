"""Tiny Würstchen components with random weights, built with diffusers' own classes (the reference)
and a character-level CLIP tokenizer, so nothing is downloaded."""

from __future__ import annotations

import dataclasses
import math

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from wuerstchen.models.stage_a import STAGE_A_PRESETS
from wuerstchen.models.stage_b import STAGE_B_PRESETS
from wuerstchen.models.stage_c import STAGE_C_PRESETS


def char_tokenizer() -> CLIPTokenizer:
    """Byte-level symbols, each also with `</w>`, and no merges: a working character tokenizer."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def text_encoder(seed: int, width: int = 32) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=514, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights at a scale that keeps activations O(1) (the reference zero-initialises its
    output heads, GRN and gammas, which would make parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _kwargs(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def diffusers_components(seed: int = 0) -> dict:
    """The nine components of diffusers' WuerstchenCombinedPipeline, tiny and random."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    prior = randomize(WuerstchenPrior(**_kwargs(STAGE_C_PRESETS["tiny"])), seed + 1)
    decoder = randomize(WuerstchenDiffNeXt(**_kwargs(STAGE_B_PRESETS["tiny"])), seed + 3)
    with torch.no_grad():  # tame heads: b near 0, so ε = (x − a)/|1 − b| (or /b) is well conditioned
        prior.out[1].weight.mul_(0.1)
        decoder.clf[1].weight.mul_(0.1)
    return dict(
        prior_prior=prior,
        prior_text_encoder=text_encoder(seed + 2),
        prior_tokenizer=char_tokenizer(),
        prior_scheduler=DDPMWuerstchenScheduler(),
        decoder=decoder,
        text_encoder=text_encoder(seed + 4),
        tokenizer=char_tokenizer(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=randomize(PaellaVQModel(**_kwargs(STAGE_A_PRESETS["tiny"])), seed + 5),
    )
