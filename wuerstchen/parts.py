"""What one Würstchen generation is made of, as the pipeline composes it: per stage, how its
conditions are prepared once per generation, what shape its latents have, how it is guided, and how
its result maps to the next stage. `WuerstchenPipeline` runs the parts in order (encode text →
Stage C → map → Stage B → Stage A); a second generation is a second set of parts, not branches in
the pipeline.

    denoise = PRIOR_V2.denoiser(prior, text_states, guidance_scale=4.0)   # x, r → ε
    x = sample(denoise, noise, times)
    semantic = PRIOR_V2.to_decoder(x, settings)                          # x · 42 − 1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import UserError
from .models.stage_a import StageA
from .models.stage_b import StageB
from .models.stage_c import StageC
from .models.text import encode_prompts, encode_prompts_pooled
from .sampling import DEFAULT_STAGE_C_TIMESTEPS, shifted_timesteps

if TYPE_CHECKING:
    from .models.cascade import CascadeUNet

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, r) → ε, float32
# A stage's text conditions, batch first, as its part encodes them: v2 (token states,); Stable
# Cascade's prior (token states, pooled embedding), its decoder (pooled embedding,).
Text = tuple[Tensor, ...]


def _dtype(model: nn.Module) -> torch.dtype:
    """The model's float dtype, from its parameters (an int8 layer of `wuerstchen.quant` has none)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@dataclass(frozen=True)
class PipelineSettings:
    """How the stages fit together (diffusers keeps these in `model_index.json`)."""

    # Stage C's latents are the semantic latent z stored as (z + shift) / scale; sampled ones map
    # back to x · scale − shift (x · 42 − 1 for the official v2 weights). model_index.json names
    # them `latent_mean` (the scale) and `latent_std` (the shift): see `INDEX_NAMES`.
    latent_scale: float = 42.0
    latent_shift: float = 1.0
    resolution_multiple: float = 42.67  # image side / Stage C latent side
    latent_dim_scale: float = 10.67  # Stage B latent side / Stage C latent side
    s: float = 0.008  # cosine-schedule offset of both schedulers
    default_size: int = 1024  # the size the weights were trained at

    def prior_side(self, hw: tuple[int, ...]) -> tuple[int, int]:
        """Image (height, width) in px → the Stage C latent's: ⌈side / 42.67⌉ for the official weights."""
        return math.ceil(hw[0] / self.resolution_multiple), math.ceil(hw[1] / self.resolution_multiple)


# PipelineSettings field ← its key in diffusers' model_index.json, where the names differ.
INDEX_NAMES = {"latent_scale": "latent_mean", "latent_shift": "latent_std"}


def guided(model_out: Callable[[Tensor, Tensor], Tensor], guidance_scale: float) -> Denoiser:
    """Classifier-free guidance over a model call that returns [cond; uncond] stacked on the batch:
    `lerp(uncond, cond, w)`; without guidance (w ≤ 1) the call returns the conditioned rows only."""
    if guidance_scale <= 1:
        return lambda x, r: model_out(x, r).float()

    def denoise(x: Tensor, r: Tensor) -> Tensor:
        eps_cond, eps_uncond = model_out(x, r).float().chunk(2)
        return torch.lerp(eps_uncond, eps_cond, guidance_scale)

    return denoise


class PriorV2:
    """Stage C of Würstchen v2: CLIP text states → a 16-channel semantic latent at 1/42.67 of the
    image side. The text K/V of every attention block is computed once per generation; with CFG the
    latent enters once for both halves (`copies=2`)."""

    name = "Würstchen v2"
    combined_class = "WuerstchenCombinedPipeline"  # model_index.json of our save_pretrained
    # diffusers' call defaults; the commands run the official 30-time schedule (`command_times`).
    defaults = {"prior_steps": 60, "decoder_steps": 12, "prior_guidance": 4.0, "decoder_guidance": 0.0}
    command_times: list[float] | None = DEFAULT_STAGE_C_TIMESTEPS

    def encode_text(self, tokenizer: Any, encoder: nn.Module, texts: list[str], device: torch.device,
                    weighting: bool, warn: bool) -> Text:  # fmt: skip
        return (encode_prompts(tokenizer, encoder, texts, device, weighting, warn),)

    def encode_images(self, pipe: Any, images: Any, weights: Sequence[float] | None = None) -> None:
        self.image_condition(pipe, images, weights, None, 1, False)

    def image_condition(self, pipe: Any, images: Any, weights: Any, image_embeds: Tensor | None, n: int,
                        cfg: bool) -> None:  # fmt: skip
        if images is not None or image_embeds is not None:
            raise UserError("Würstchen v2 takes no image inputs: image variations need a Stable Cascade model")

    def latent_shape(self, model: StageC, n: int, height: int, width: int, st: PipelineSettings) -> tuple[int, ...]:
        return (n, model.config.c_in, *st.prior_side((height, width)))

    def denoiser(self, model: StageC, run: nn.Module, text: Text, guidance_scale: float, image: None) -> Denoiser:
        """`run` is the module to call (the model itself, or its compiled form)."""
        dtype = _dtype(model)
        kv = model.condition(text[0].to(dtype))
        copies = 2 if guidance_scale > 1 else 1
        return guided(lambda x, r: run(x.to(dtype), r, kv=kv, copies=copies), guidance_scale)

    def to_decoder(self, x: Tensor, st: PipelineSettings) -> Tensor:
        """Prior space → the semantic latent Stage B reads (x · 42 − 1 for the official weights)."""
        return x * st.latent_scale - st.latent_shift

    def from_decoder(self, z: Tensor, st: PipelineSettings) -> Tensor:
        """The semantic latent → the prior's space, where the sampler adds its noise (training)."""
        return (z + st.latent_shift) / st.latent_scale


class DecoderV2:
    """Stage B of Würstchen v2: semantic latent + CLIP text states → Stage A latent, 10.67× the
    semantic side. Its conditioning (text K/V, the semantic latent resized to every level) is
    computed once per generation; CFG runs both halves in one batch, the unconditioned half with
    a zeroed semantic latent."""

    encode_text = PriorV2.encode_text

    def text_from_prior(self, text: Text | None, negative: Text | None) -> None:
        """v2's decoder has a text encoder of its own (CLIP ViT-H for the official weights)."""
        return None

    def size_step(self, st: PipelineSettings, decoder: StageB | None, vqgan: StageA | None) -> int:
        """The smallest image side whose Stage C side k, Stage B side (k · latent_dim_scale, divisible
        by the decoder's stride: its U-Net adds skips of exactly half/double sizes) and pixels (Stage B
        side × the VQGAN's downscale) are all whole: 128 px for the official weights."""
        stride = decoder.config.stride if decoder is not None else 1
        down = vqgan.config.downscale if vqgan is not None else 4
        for k in range(1, 257):
            px = round(k * st.resolution_multiple)
            b_side = int(k * st.latent_dim_scale)
            if math.ceil(px / st.resolution_multiple) == k and b_side % stride == 0 and b_side * down == px:
                return px
        raise UserError("these pipeline settings admit no image size whose latents fit every stage")

    def latent_shape(self, model: StageB, semantic: Tensor, st: PipelineSettings, image_size: Any = None,
                     vqgan: Any = None) -> tuple[int, ...]:  # fmt: skip
        """k · latent_dim_scale of the semantic side (diffusers'); at the sizes `size_step` admits,
        that is the image side / the VQGAN's downscale."""
        h, w = (int(side * st.latent_dim_scale) for side in semantic.shape[2:])
        return (semantic.shape[0], model.config.c_in, h, w)

    def denoiser(self, model: StageB, run: nn.Module, semantic: Tensor, text: Text, guidance_scale: float,
                 size: tuple[int, int]) -> Denoiser:  # fmt: skip
        dtype = _dtype(model)
        cfg = guidance_scale > 1
        effnet = torch.cat([semantic, torch.zeros_like(semantic)]) if cfg else semantic
        cond = model.condition(effnet.to(dtype), text[0].to(dtype), size)
        if not cfg:
            return guided(lambda x, r: run(x.to(dtype), r, cond=cond), guidance_scale)
        return guided(lambda x, r: run(torch.cat([x, x]).to(dtype), torch.cat([r, r]), cond=cond), guidance_scale)


class PriorV3:
    """Stage C of Stable Cascade (v3): CLIP-G token states, its pooled embedding and CLIP image
    embeddings → a 16-channel latent at 1/42.67 of the image side, which Stage B reads as it is.
    As diffusers' `StableCascadePriorPipeline`: the unconditioned half of CFG has the negative
    prompt's text and zero image embeddings; without images both halves have one zero image token."""

    name = "Stable Cascade"
    combined_class = "StableCascadeCombinedPipeline"
    defaults = {"prior_steps": 20, "decoder_steps": 10, "prior_guidance": 4.0, "decoder_guidance": 0.0}
    command_times: list[float] | None = None  # diffusers' 20 even steps

    def encode_text(self, tokenizer: Any, encoder: nn.Module, texts: list[str], device: torch.device,
                    weighting: bool, warn: bool) -> Text:  # fmt: skip
        return encode_prompts_pooled(tokenizer, encoder, texts, device, weighting, warn)

    def encode_images(self, pipe: Any, images: Any, weights: Sequence[float] | None = None) -> Tensor:
        """Images (PIL images, or image tensors as the feature extractor takes them) → the image
        conditions (1, k, D): one CLIP image embedding per image, as diffusers computes it, times
        its weight (default 1)."""
        if pipe.image_encoder is None or pipe.feature_extractor is None:
            raise UserError("this model has no image encoder (image_encoder/, feature_extractor/): it takes no images")
        items = list(images) if isinstance(images, list | tuple) or getattr(images, "dim", int)() == 4 else [images]
        weights = [1.0] * len(items) if weights is None else [float(w) for w in weights]
        if len(weights) != len(items):
            raise UserError(f"got {len(weights)} image weights for {len(items)} images: give one per image")
        dtype = next(pipe.image_encoder.parameters()).dtype
        with pipe._placed("image_encoder") as encoder:
            pixels = [pipe.feature_extractor(im, return_tensors="pt").pixel_values for im in items]
            embeds = [encoder(px.to(pipe.device, dtype)).image_embeds for px in pixels]
        return torch.cat([e * w if w != 1 else e for e, w in zip(embeds, weights, strict=True)])[None]

    def image_condition(self, pipe: Any, images: Any, weights: Sequence[float] | None, image_embeds: Tensor | None,
                        n: int, cfg: bool) -> Tensor:  # fmt: skip
        """(n, k, D) image embeddings for the n rows of the batch ([cond; zeros] with CFG), from
        `images` (weighted, `encode_images`) or given `image_embeds`; one zero token without either."""
        if images is not None:
            if image_embeds is not None:
                raise UserError("pass either `images` or `image_embeds`, not both")
            image_embeds = self.encode_images(pipe, images, weights)
        if image_embeds is None:
            width = pipe.prior.config.clip_image_in_channels
            image_embeds = torch.zeros(1, 1, width)
        embeds = image_embeds if image_embeds.dim() == 3 else image_embeds[:, None]
        if n % embeds.shape[0]:
            raise UserError(f"got {embeds.shape[0]} rows of image embeddings for {n} images: give 1, or {n}")
        embeds = embeds.to(pipe.device).repeat(n // embeds.shape[0], 1, 1)
        return torch.cat([embeds, torch.zeros_like(embeds)]) if cfg else embeds

    def latent_shape(self, model: CascadeUNet, n: int, height: int, width: int,
                     st: PipelineSettings) -> tuple[int, ...]:  # fmt: skip
        return (n, model.config.in_channels, *st.prior_side((height, width)))

    def denoiser(self, model: CascadeUNet, run: nn.Module, text: Text, guidance_scale: float,
                 image: Tensor) -> Denoiser:  # fmt: skip
        if len(text) != 2:
            raise UserError("Stable Cascade's prior reads token states and their pooled embedding: give "
                            "`prompt_embeds_pooled` with `prompt_embeds` (and the negatives' likewise)")  # fmt: skip
        dtype = next(model.parameters()).dtype
        states, pooled = (t.to(dtype) for t in text)
        cond = model.condition(clip_text_pooled=pooled, clip_text=states, clip_img=image.to(dtype))
        if guidance_scale <= 1:
            return guided(lambda x, r: run(x.to(dtype), r.to(dtype), cond=cond), guidance_scale)
        both = lambda x, r: run(torch.cat([x, x]).to(dtype), torch.cat([r, r]).to(dtype), cond=cond)  # noqa: E731
        return guided(both, guidance_scale)

    def to_decoder(self, x: Tensor, st: PipelineSettings) -> Tensor:
        return x

    def from_decoder(self, z: Tensor, st: PipelineSettings) -> Tensor:
        return z


class DecoderV3:
    """Stage B of Stable Cascade: the Stage C latent + the pooled CLIP-G text embedding → Stage A
    latent, 10.67× the Stage C side. In a text-to-image call it reads the prior's pooled embeddings
    (diffusers' combined pipeline does so too); CFG zeroes the semantic latent of the second half."""

    def encode_text(self, tokenizer: Any, encoder: nn.Module, texts: list[str], device: torch.device,
                    weighting: bool, warn: bool) -> Text:  # fmt: skip
        return encode_prompts_pooled(tokenizer, encoder, texts, device, weighting, warn)[1:]

    def text_from_prior(self, text: Text | None, negative: Text | None) -> tuple[Text, Text | None] | None:
        if text is None or len(text) != 2:
            return None
        return text[1:], (negative[1:] if negative is not None else None)

    def size_step(self, st: PipelineSettings, decoder: CascadeUNet | None, vqgan: StageA | None) -> int:
        """8 px: any image side whose Stage B latent (side / the VQGAN's downscale) divides into
        the decoder's patches. The U-Net resizes an odd level to its skip's size, and the semantic
        latent is resized to the first level, so no other side is needed (the official code and
        ComfyUI take sizes in steps of 8 too)."""
        down = vqgan.config.downscale if vqgan is not None else 4
        return down * (decoder.config.patch_size if decoder is not None else 1)

    def latent_shape(self, model: CascadeUNet, semantic: Tensor, st: PipelineSettings,
                     image_size: tuple[int, int] | None = None,
                     vqgan: StageA | None = None) -> tuple[int, ...]:  # fmt: skip
        """The image side / the VQGAN's downscale when the image size is known (a text-to-image call:
        the official sampler's Stage B size), else k · latent_dim_scale of the semantic side
        (diffusers' decoder). Both agree at every multiple of 128 px, where diffusers works."""
        if image_size is not None:
            down = vqgan.config.downscale if vqgan is not None else 4
            h, w = image_size[0] // down, image_size[1] // down
        else:
            h, w = (int(side * st.latent_dim_scale) for side in semantic.shape[2:])
        return (semantic.shape[0], model.config.in_channels, h, w)

    def denoiser(self, model: CascadeUNet, run: nn.Module, semantic: Tensor, text: Text, guidance_scale: float,
                 size: tuple[int, int]) -> Denoiser:  # fmt: skip
        dtype = next(model.parameters()).dtype
        cfg = guidance_scale > 1
        effnet = torch.cat([semantic, torch.zeros_like(semantic)]) if cfg else semantic
        cond = model.condition(clip_text_pooled=text[0].to(dtype), effnet=effnet.to(dtype), size=size)
        if not cfg:
            return guided(lambda x, r: run(x.to(dtype), r.to(dtype), cond=cond), guidance_scale)
        both = lambda x, r: run(torch.cat([x, x]).to(dtype), torch.cat([r, r]).to(dtype), cond=cond)  # noqa: E731
        return guided(both, guidance_scale)


PRIOR_V2 = PriorV2()
DECODER_V2 = DecoderV2()
PRIOR_V3 = PriorV3()
DECODER_V3 = DecoderV3()


def prior_times(part: Any, steps: int | None, shift: float = 1.0) -> list[float]:
    """The Stage C schedule the CLI and the server run: `steps` even steps (moved by the schedule
    `shift`, see `shifted_timesteps`), or without `steps` the generation's default."""
    if steps is None and part.command_times is not None and shift == 1:
        return part.command_times
    return shifted_timesteps(part.defaults["prior_steps"] if steps is None else steps, shift)


def parts_for(prior: nn.Module | None, decoder: nn.Module | None) -> tuple[Any, Any]:
    """The generation's parts, from the models' classes: Stable Cascade's U-Net or v2's networks."""
    cascade = [getattr(m, "diffusers_class", None) == "StableCascadeUNet" for m in (prior, decoder) if m is not None]
    v3 = any(cascade)
    if v3 and not all(cascade):
        raise UserError("a Würstchen v2 model and a Stable Cascade model cannot form one pipeline: load one generation")
    return (PRIOR_V3, DECODER_V3) if v3 else (PRIOR_V2, DECODER_V2)
