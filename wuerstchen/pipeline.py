"""The text-to-image cascade: encode text once → sample Stage C → map the latent → sample Stage B →
decode with Stage A.

`WuerstchenPipeline.__call__` takes the arguments of diffusers' `WuerstchenCombinedPipeline` and,
given the same `torch.Generator`, draws its noise in the same order, so the same seed gives the same
image as the reference. Example::

    import torch
    from wuerstchen import DEFAULT_STAGE_C_TIMESTEPS, WuerstchenPipeline

    pipe = WuerstchenPipeline.from_pretrained("warp-ai/wuerstchen", torch_dtype=torch.bfloat16)
    images = pipe("an astronaut riding a horse", height=1024, width=1536,
                  prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, prior_guidance_scale=4.0,
                  num_images_per_prompt=4).images
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from . import image_inputs
from .errors import UserError
from .image_inputs import ImageSource
from .models.stage_a import StageA
from .models.stage_b import StageB
from .models.stage_c import StageC
from .parts import Denoiser, PipelineSettings, Text, parts_for
from .placement import Placement
from .quant import quantize as _quantize
from .sampling import Generator, randn, sample, timesteps

if TYPE_CHECKING:
    from .models.cascade import CascadeUNet

logger = logging.getLogger(__name__)

# A step callback for progress bars, previews and cancellation: (stage, step, total, latents).
StepHook = Callable[[str, int, int, Tensor], None]


@dataclass
class WuerstchenPipelineOutput:
    images: Any  # list of PIL images, np.ndarray (B, H, W, 3), Tensor (B, 3, H, W), or latents


@dataclass
class PriorOutput:
    image_embeddings: Tensor  # Stage C latents mapped for Stage B: (B, 16, h, w)
    generator: Generator = field(default=None, repr=False)
    # The prior's text conditions per image (B rows), and the negatives' when it was guided: Stable
    # Cascade's decoder reads the prior's pooled embeddings (as diffusers' combined pipeline).
    text: Text | None = field(default=None, repr=False)
    negative_text: Text | None = field(default=None, repr=False)
    image_size: tuple[int, int] | None = None  # (H, W) the latents were sampled for


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        if not value:
            raise UserError(f"`{name}` is an empty list: give at least one prompt")
        return list(value)
    raise TypeError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}")


def _prior_prompts(prompt: str | Sequence[str] | None, embeds: Tensor | None) -> list[str] | None:
    prompts = _as_list(prompt, "prompt")
    if prompts is not None and embeds is not None:
        raise UserError("pass either `prompt` or `prompt_embeds`, not both")
    return [""] if prompts is None and embeds is None else prompts  # unconditional without either


def _decoder_prompts(prompt: str | Sequence[str] | None, embeds: Any, per_latent: int) -> list[str] | None:
    """The decoder's prompts, one per semantic latent (one prompt serves all); None with `embeds`."""
    prompts = _as_list(prompt, "prompt")
    if embeds is None:
        prompts = prompts or [""]
        prompts = prompts * per_latent if len(prompts) == 1 else prompts
        if len(prompts) != per_latent:
            raise UserError(f"got {len(prompts)} prompts for {per_latent} semantic latents")
    return prompts


def _check_steps(steps: int, custom: Sequence[float] | None, name: str) -> list[float]:
    if custom is not None:
        times = [float(t) for t in custom]
        if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:], strict=False)):
            raise UserError(f"`{name}` must be at least two strictly decreasing times in [0, 1], e.g. [1.0, 0.5, 0.0]")
        if times[0] > 1 or times[-1] < 0:
            raise UserError(f"`{name}` must lie in [0, 1]")
        return times
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"the number of steps must be an integer ≥ 1, got {steps!r}")
    return timesteps(steps)


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"`num_images_per_prompt` must be an integer ≥ 1, got {n!r}")


def _check_output_type(output_type: str) -> None:
    if output_type not in ("pil", "np", "pt", "latent"):
        raise UserError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")


def _noise(
    latents: Tensor | None, shape: tuple[int, ...], generator: Generator, device: torch.device, what: str
) -> Tensor:
    """The starting latents: given ones (checked against `shape`) or noise drawn as diffusers does."""
    if latents is None:
        return randn(shape, generator, device, torch.float32)
    if tuple(latents.shape) != shape:
        raise UserError(f"{what} has shape {tuple(latents.shape)}, expected {shape}")
    return latents.to(device, torch.float32)


def _snap(name: str, value: int | None, step: int, default: int) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer number of pixels, got {value!r}")
    if value < step:
        raise UserError(f"{name}={value} is too small: this model needs at least {step} px (a multiple of {step})")
    if value % step:
        logger.warning("%s=%d is not a multiple of %d px; using %d", name, value, step, value - value % step)
    return value - value % step


def _generators(generator: Generator, seed: int | None, count: int) -> Generator:
    """`seed` gives image i of the batch the seed `seed + i`, so each can be made again alone."""
    if seed is not None:
        if generator is not None:
            raise UserError("pass either `seed` or `generator`, not both")
        return [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(count)]
    if isinstance(generator, list) and len(generator) != count:
        raise UserError(f"got {len(generator)} generators for {count} images: give one per image")
    return generator


def _with_negatives(encode: Callable[[list[str]], Text], cond: Text, negative: list[str] | None,
                    negative_embeds: Text | None, repeat: int) -> Text:  # fmt: skip
    """[cond; uncond] for classifier-free guidance: one negative prompt for all, or one per prompt,
    or given states; the empty prompt when none is given."""
    if negative_embeds is None:
        batch = cond[0].shape[0] // repeat
        negative = negative or [""]
        if len(negative) not in (1, batch):
            raise UserError(f"got {len(negative)} negative prompts for {batch} prompts: give one, or one per prompt")
        negative_embeds = encode(negative * batch if len(negative) == 1 else negative)
    if len(negative_embeds) != len(cond):
        raise UserError("give the negative prompt's pooled embedding too, as for the prompt")
    out = []
    for c, u in zip(cond, negative_embeds, strict=True):
        u = u.to(c.device, c.dtype).repeat_interleave(repeat, dim=0)
        if u.shape != c.shape:
            raise UserError(f"negative text states {tuple(u.shape)} do not match the prompt's {tuple(c.shape)}")
        out.append(torch.cat([c, u]))
    return tuple(out)


def _given(embeds: Tensor | None, pooled: Tensor | None, what: str) -> Text | None:
    """User-given text conditions as the parts take them: (states,) or (states, pooled)."""
    if embeds is None:
        if pooled is not None:
            raise UserError(f"`{what}_pooled` needs `{what}` too (the token states it was pooled from)")
        return None
    return (embeds,) if pooled is None else (embeds, pooled if pooled.dim() == 3 else pooled[:, None])


def _check_finite(x: Tensor, stage: str) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"{stage} produced NaN/inf values ({x.dtype}): the official Würstchen weights overflow in "
            "float16; load with torch_dtype=torch.bfloat16 or torch.float32"
        )


def to_output(images: Tensor, output_type: str) -> Any:
    """(B, 3, H, W) in [0, 1] → the requested output type."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().clip(0, 255).astype(np.uint8)) for a in array]


class WuerstchenPipeline:
    """Prior (Stage C) + decoder (Stage B) + VQGAN (Stage A), each with its text encoder, of
    Würstchen v2 or Stable Cascade; the generation's parts (`parts.py`, chosen by the models'
    classes) say how each stage is conditioned, guided and mapped."""

    # fmt: off
    def __init__(
        self, prior: StageC | CascadeUNet | None, prior_text_encoder: nn.Module | None, prior_tokenizer: Any,
        decoder: StageB | CascadeUNet | None, text_encoder: nn.Module | None, tokenizer: Any, vqgan: StageA | None,
        settings: PipelineSettings | None = None, semantic: nn.Module | None = None,
        image_encoder: nn.Module | None = None, feature_extractor: Any = None, previewer: nn.Module | None = None,
    ) -> None:
        # fmt: on
        self.prior, self.prior_text_encoder, self.prior_tokenizer = prior, prior_text_encoder, prior_tokenizer
        self.decoder, self.text_encoder, self.tokenizer = decoder, text_encoder, tokenizer
        self.vqgan, self.semantic = vqgan, semantic
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor  # Stable Cascade's prior
        self.previewer = previewer  # Stable Cascade's official Stage C latent → RGB net (UI previews)
        self.prior_part, self.decoder_part = parts_for(prior, decoder)
        self.settings = settings or PipelineSettings()
        self.placement = Placement()
        # CPU: these stages' Linears run on oneDNN, weights packed once per loop, GELU fused (models/onednn.py),
        # for one more copy of their weights; not the decoder's: the largest, they would raise the peak memory.
        self.packed_stages: tuple[str, ...] = ("prior", "vqgan")

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, prior: str | Path | None = None, **kwargs: Any) -> Self:
        """Load a diffusers-format folder or hub id (see `wuerstchen.io.folders.load_pipeline`)."""
        from .io.folders import load_pipeline

        return load_pipeline(cls, path_or_id, prior=prior, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the combined diffusers layout (`prior_prior/`, `decoder/`, `vqgan/`, ...)."""
        from .io.folders import save_pipeline

        save_pipeline(self, folder)

    def quantize(self, mode: str) -> Self:  # int8 prior, decoder, VQGAN in place: "int8", "int8-weights" (quant.py)
        return _quantize(self, mode)

    def load_lora_weights(self, path: str | Path, scale: float = 1.0, adapter_name: str = "default") -> None:
        """Apply a LoRA file to the prior (see `wuerstchen.lora`); `unload_lora_weights` undoes it exactly."""
        from .lora import load_lora_weights

        load_lora_weights(self, path, scale, adapter_name)

    def unload_lora_weights(self, adapter_name: str | None = None) -> None:
        """Remove one LoRA (or all): the prior is the base model again, bit for bit."""
        from .lora import unload_lora

        unload_lora(self, adapter_name)

    # ----------------------------------------------------------------------------- devices
    def modules(self) -> dict[str, nn.Module]:
        names = ("prior", "prior_text_encoder", "image_encoder", "decoder", "text_encoder", "vqgan", "semantic",
                 "previewer")  # fmt: skip
        return {n: m for n in names if (m := getattr(self, n)) is not None}

    @property
    def device(self) -> torch.device:
        return self.placement.device

    def to(self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> Self:
        """Move and/or cast every model as diffusers does: `to("cuda")`, `to(torch.bfloat16)`, or both."""
        self.placement.move(self.modules(), device, dtype)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str | None = None) -> None:
        """Keep every model on the CPU and move each to `device` only while it runs (any device)."""
        self.placement.enable_offload("model", device, self.modules())

    def enable_sequential_cpu_offload(self, device: torch.device | str | None = None) -> None:
        """Move each layer to `device` only for its own forward: slowest, least memory."""
        self.placement.enable_offload("sequential", device, self.modules())

    def compile(self, freeze: bool | None = None, **options: Any) -> None:
        """Opt-in `torch.compile` (inductor) of prior, decoder and VQGAN decode; the first call at each
        size compiles (tens of seconds on a CPU). `freeze`, `options`: see `Placement.compile`."""
        fns = {"prior": self.prior, "decoder": self.decoder, "vqgan": self.vqgan and self.vqgan.decode_latents}
        self.placement.compile({n: f for n, f in fns.items() if f is not None}, freeze, options)

    def _placed(self, name: str):
        return self.placement.placed(name, getattr(self, name), packed=name in self.packed_stages)

    # ----------------------------------------------------------------------------- sizes
    @property
    def size_step(self) -> int:
        """The image-side step (px) at which every stage's latent size is whole: 128 for official weights."""
        return self.decoder_part.size_step(self.settings, self.decoder, self.vqgan)

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Snap a size down to the model's step with a warning; refuse one below a single step."""
        default, step = self.settings.default_size, self.size_step
        return _snap("height", height, step, default), _snap("width", width, step, default)

    def prior_latent_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(self.prior_part.latent_shape(self.prior, 1, height, width, self.settings)[2:])

    # ----------------------------------------------------------------------------- text
    # fmt: off
    def encode_prompt(
        self, which: str, prompts: list[str] | None, negative: list[str] | None, cfg: bool, repeat: int,
        prompt_embeds: Text | None = None, negative_prompt_embeds: Text | None = None, weighting: bool = True,
        warn: bool = True,
    ) -> Text:
        # fmt: on
        """Text conditions for one stage ("prior" or "decoder"), as its part reads them (v2: the token
        states (B·repeat, L, D); v3's prior: those and the pooled embedding), the negatives' appended
        when `cfg`. `warn=False`: no words-outside-the-vocabulary or truncation warnings."""
        tokenizer = self.prior_tokenizer if which == "prior" else self.tokenizer
        name = "prior_text_encoder" if which == "prior" else "text_encoder"
        part = self.prior_part if which == "prior" else self.decoder_part

        def encode(texts: list[str]) -> Text:
            with self._placed(name) as encoder:
                return part.encode_text(tokenizer, encoder, texts, self.device, weighting, warn)

        cond = prompt_embeds if prompt_embeds is not None else encode(prompts)
        cond = tuple(t.to(self.device).repeat_interleave(repeat, dim=0) for t in cond)
        return _with_negatives(encode, cond, negative, negative_prompt_embeds, repeat) if cfg else cond

    def encode_images(self, images: Any, weights: Sequence[float] | None = None) -> Tensor:
        """Images → the prior's image conditions (1, k, D) (Stable Cascade: see `PriorV3.encode_images`)."""
        return self.prior_part.encode_images(self, images, weights)

    # ----------------------------------------------------------------------------- stages
    def _sample(self, stage: str, make_denoiser: Callable[[Callable], Denoiser], x: Tensor, times: list[float],
                sampler: str, generator: Generator, pipe_cb: Callable | None, hook: StepHook | None,
                keep: image_inputs.Keep | None = None) -> Tensor:  # fmt: skip
        """One stage's sampling loop, with diffusers' `callback_on_step_end(pipe, i, t, kwargs)` (which
        may replace the latents), our `step_hook(stage, step, total, latents)` and (inpainting) `keep`."""
        if len(times) < 2:  # image-to-image at strength 0: the image's latent as it is
            return x

        def callback(i: int, t: float, x: Tensor) -> Tensor | None:
            x = kept = keep(i, x) if keep is not None else x
            replaced = (pipe_cb(None, i, torch.tensor(t), {"latents": x}) or {}).get("latents") if pipe_cb else None
            if hook is not None:
                hook(stage, i + 1, len(times) - 1, x if replaced is None else replaced)
            return kept if replaced is None else replaced

        with self._placed(stage) as run:
            denoise = make_denoiser(run)
            x = sample(denoise, x, times, sampler=sampler, generator=generator, s=self.settings.s, callback=callback)
        _check_finite(x, "Stage C (prior)" if stage == "prior" else "Stage B (decoder)")
        return x

    @torch.no_grad()
    # fmt: off
    def generate_prior(
        self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
        num_inference_steps: int | None = None, timesteps: Sequence[float] | None = None, guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None, prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None, num_images_per_prompt: int = 1, generator: Generator = None,
        seed: int | None = None, latents: Tensor | None = None, callback_on_step_end: Callable | None = None,
        step_hook: StepHook | None = None, sampler: str = "ddpm", prompt_weighting: bool = True,
        prompt_embeds_pooled: Tensor | None = None, negative_prompt_embeds_pooled: Tensor | None = None,
        images: Any = None, image_embeds: Tensor | None = None, image_weights: Sequence[float] | None = None,
        image_source: ImageSource | None = None,
    ) -> PriorOutput:
        # fmt: on
        """Stage C alone: text (and, for Stable Cascade, images) → semantic latents, mapped for Stage B;
        from an image's latent where `image_source` says (`image_inputs.prepare`)."""
        if self.prior is None:
            raise UserError("this pipeline has no prior (Stage C): load one to generate from text")
        prompts = _prior_prompts(prompt, prompt_embeds)
        _check_count(num_images_per_prompt)
        height, width = self.check_size(height, width)
        steps = self.prior_part.defaults["prior_steps"] if num_inference_steps is None else num_inference_steps
        times = _check_steps(steps, timesteps, "prior_timesteps")
        n = (len(prompts) if prompts is not None else prompt_embeds.shape[0]) * num_images_per_prompt
        generator = _generators(generator, seed, n)
        negatives, cfg = _as_list(negative_prompt, "negative_prompt"), guidance_scale > 1
        given = _given(prompt_embeds, prompt_embeds_pooled, "prompt_embeds")
        given_neg = _given(negative_prompt_embeds, negative_prompt_embeds_pooled, "negative_prompt_embeds")
        text = self.encode_prompt("prior", prompts, negatives, cfg, num_images_per_prompt, given, given_neg,
                                  prompt_weighting)  # fmt: skip
        image = self.prior_part.image_condition(self, images, image_weights, image_embeds, n, cfg)
        shape = self.prior_part.latent_shape(self.prior, n, height, width, self.settings)
        x = _noise(latents, shape, generator, self.device, "`latents`")
        x, times, keep = image_inputs.begin(self, image_source, "prior", x, times)
        denoiser = lambda run: self.prior_part.denoiser(self.prior, run, text, guidance_scale, image)  # noqa: E731
        x = self._sample("prior", denoiser, x, times, sampler, generator, callback_on_step_end, step_hook, keep)
        halves = [tuple(t.chunk(2)[i] for t in text) for i in (0, 1)] if cfg else [text, None]
        return PriorOutput(self.prior_part.to_decoder(x, self.settings), generator, *halves, (height, width))

    @torch.no_grad()
    # fmt: off
    def decode(
        self, image_embeddings: Tensor, prompt: str | list[str] | None = None, num_inference_steps: int | None = None,
        timesteps: Sequence[float] | None = None, guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None, prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None, num_images_per_prompt: int = 1, generator: Generator = None,
        seed: int | None = None, latents: Tensor | None = None, output_type: str = "pil",
        callback_on_step_end: Callable | None = None, step_hook: StepHook | None = None, sampler: str = "ddpm",
        prompt_weighting: bool = True, warn: bool = True, image_size: tuple[int, int] | None = None,
        image_source: ImageSource | None = None,
    ) -> WuerstchenPipelineOutput:
        # fmt: on
        """Stage B + Stage A alone: semantic latents (B, 16, h, w) → images (of `image_size`, (H, W),
        where the generation's decoder takes any size: Stable Cascade; else the semantic side × 42.67).

        Each semantic latent is decoded `num_images_per_prompt` times; `prompt` is one string or
        one per semantic latent; `prompt_embeds` are text states per semantic latent.
        """
        if self.decoder is None or self.vqgan is None:
            raise UserError("this pipeline has no decoder/VQGAN (Stage B/A): load them to decode")
        _check_output_type(output_type)
        _check_count(num_images_per_prompt)
        steps = self.prior_part.defaults["decoder_steps"] if num_inference_steps is None else num_inference_steps
        times = _check_steps(steps, timesteps, "decoder_timesteps")
        prompts = _decoder_prompts(prompt, prompt_embeds, image_embeddings.shape[0])
        negatives, cfg = _as_list(negative_prompt, "negative_prompt"), guidance_scale > 1
        as_text = lambda t: (t,) if isinstance(t, Tensor) else t  # noqa: E731  (a Tensor, or a part's Text)
        text = self.encode_prompt("decoder", prompts, negatives, cfg, num_images_per_prompt, as_text(prompt_embeds),
                                  as_text(negative_prompt_embeds), prompt_weighting, warn)  # fmt: skip
        semantic = image_embeddings.to(self.device).repeat_interleave(num_images_per_prompt, dim=0)
        generator = _generators(generator, seed, semantic.shape[0])
        shape = self.decoder_part.latent_shape(self.decoder, semantic, self.settings, image_size, self.vqgan)
        x = _noise(latents, shape, generator, self.device, "decoder `latents`")
        x, times, keep = image_inputs.begin(self, image_source, "decoder", x, times)

        def denoiser(run: Callable) -> Denoiser:
            return self.decoder_part.denoiser(self.decoder, run, semantic, text, guidance_scale, shape[2:])

        x = self._sample("decoder", denoiser, x, times, sampler, generator, callback_on_step_end, step_hook, keep)
        if output_type == "latent":
            return WuerstchenPipelineOutput(x)
        images = self.decode_latents(x) if image_source is None else image_source.composite(self.decode_latents(x))
        if step_hook is not None:
            step_hook("vqgan", 1, 1, images)
        return WuerstchenPipelineOutput(to_output(images, output_type))

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Stage A alone: Stage B latents (B, 4, H/4, W/4) → float32 images in [0, 1] (B, 3, H, W)."""
        with self._placed("vqgan"):
            decode = self.placement.compiled.get("vqgan", self.vqgan.decode_latents)
            return decode(latents.to(self.device, self.vqgan.out_block[0].weight.dtype)).float()

    @torch.no_grad()
    # fmt: off
    def __call__(
        self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
        prior_num_inference_steps: int | None = None, prior_timesteps: Sequence[float] | None = None,
        prior_guidance_scale: float = 4.0, num_inference_steps: int | None = None,
        decoder_timesteps: Sequence[float] | None = None, decoder_guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None, prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None, decoder_prompt_embeds: Tensor | None = None,
        decoder_negative_prompt_embeds: Tensor | None = None, num_images_per_prompt: int = 1,
        generator: Generator = None, seed: int | None = None, latents: Tensor | None = None, output_type: str = "pil",
        return_dict: bool = True, prior_callback_on_step_end: Callable | None = None,
        callback_on_step_end: Callable | None = None, step_hook: StepHook | None = None, sampler: str = "ddpm",
        prompt_weighting: bool = True, images: Any = None, image_embeds: Tensor | None = None,
        image_weights: Sequence[float] | None = None, prompt_embeds_pooled: Tensor | None = None,
        negative_prompt_embeds_pooled: Tensor | None = None, image: Any = None, strength: float | None = None,
        mask_image: Any = None, decoder_strength: float | None = None,
    ) -> WuerstchenPipelineOutput | tuple:
        # fmt: on
        """Text → images. Arguments as diffusers' `WuerstchenCombinedPipeline`, plus:

        - `seed`: image i of the batch gets seed `seed + i` (instead of one shared `generator`);
        - `decoder_prompt_embeds` / `decoder_negative_prompt_embeds`: text states for Stage B's
          encoder (`prompt_embeds` are Stage C's), for Compel and similar libraries;
        - `step_hook(stage, step, total, latents)`: progress/preview/cancel (raise to cancel);
        - `sampler`: "ddpm" (the reference) or "ddim" (deterministic);
        - `prompt_weighting`: understand `(word:1.3)` / `[word]` (default on);
        - `image`, `strength`, `mask_image` (white = repaint), `decoder_strength`: image-to-image and
          inpainting (see `wuerstchen.image_inputs`); `images`: Stable Cascade's image conditions.
        """
        _check_output_type(output_type)  # before the prior runs, not after
        source, height, width = image_inputs.prepare(self, image, mask_image, strength, decoder_strength, height, width)
        prior = self.generate_prior(
            prompt=prompt, height=height, width=width, num_inference_steps=prior_num_inference_steps,
            timesteps=prior_timesteps, guidance_scale=prior_guidance_scale, negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed, latents=latents,
            callback_on_step_end=prior_callback_on_step_end, step_hook=step_hook, sampler=sampler,
            prompt_weighting=prompt_weighting, images=images, image_embeds=image_embeds, image_weights=image_weights,
            prompt_embeds_pooled=prompt_embeds_pooled, negative_prompt_embeds_pooled=negative_prompt_embeds_pooled,
            image_source=source,
        )  # fmt: skip
        text, neg = _decoder_text(
            self, prior, prompt, negative_prompt, decoder_prompt_embeds, decoder_negative_prompt_embeds,
            decoder_guidance_scale > 1, num_images_per_prompt, prompt_weighting, warn=prompt_embeds is not None,
        )  # fmt: skip
        out = self.decode(
            prior.image_embeddings, num_inference_steps=num_inference_steps, timesteps=decoder_timesteps,
            guidance_scale=decoder_guidance_scale, prompt_embeds=text, negative_prompt_embeds=neg,
            generator=prior.generator, output_type=output_type, callback_on_step_end=callback_on_step_end,
            step_hook=step_hook, sampler=sampler, prompt_weighting=prompt_weighting, image_size=prior.image_size,
            image_source=source,
        )  # fmt: skip
        return out if return_dict else (out.images,)

    def variations(self, image: Any, num_images: int = 4, prompt: str | None = None, **kwargs: Any) -> Any:
        return image_inputs.variations(self, image, num_images, prompt, **kwargs)


def _decoder_text(pipe: WuerstchenPipeline, prior: PriorOutput, prompt: Any, negative_prompt: Any,
                  embeds: Tensor | None, negative_embeds: Tensor | None, cfg: bool, n: int, weighting: bool,
                  warn: bool) -> tuple[Text, Text | None]:  # fmt: skip
    """Stage B's text conditions per image in a text-to-image call: the prior's, where the part
    reads those (Stable Cascade), else the prompts through the decoder's own text encoder, once
    per prompt and repeated for each of its images (diffusers' v2 decoder multiplies a list of
    prompts twice here). The prior's encoder has warned about the prompts already."""
    prompts = _as_list(prompt, "prompt") or [""] * (prior.image_embeddings.shape[0] // n)
    per_image = lambda t: tuple(x.repeat_interleave(n, dim=0) for x in t)  # noqa: E731

    def encoded(texts: list[str]) -> Text:
        return per_image(pipe.encode_prompt("decoder", texts, None, False, 1, weighting=weighting, warn=warn))

    reused = pipe.decoder_part.text_from_prior(prior.text, prior.negative_text)
    text = per_image((embeds,)) if embeds is not None else reused[0] if reused else encoded(prompts)
    if not cfg:
        return text, None
    if negative_embeds is not None:
        return text, per_image((negative_embeds,))
    if reused and reused[1] is not None:
        return text, reused[1]
    negatives = _as_list(negative_prompt, "negative_prompt") or [""]
    return text, encoded(negatives * len(prompts) if len(negatives) == 1 else negatives)
