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
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .hardware import check_dtype
from .models.onednn import packed_linears
from .models.stage_a import StageA
from .models.stage_b import StageB
from .models.stage_c import StageC
from .models.text import encode_prompts
from .sampling import Generator, randn, sample, timesteps

logger = logging.getLogger(__name__)

# A step callback for progress bars, previews and cancellation: (stage, step, total, latents).
StepHook = Callable[[str, int, int, Tensor], None]


@dataclass(frozen=True)
class PipelineSettings:
    """How the stages fit together (diffusers keeps these in `model_index.json`)."""

    latent_mean: float = 42.0  # prior latents are trained on (x + 1) / 42 ...
    latent_std: float = 1.0  # ... and mapped back with x · 42 − 1 (diffusers' names)
    resolution_multiple: float = 42.67  # image side / Stage C latent side
    latent_dim_scale: float = 10.67  # Stage B latent side / Stage C latent side
    s: float = 0.008  # cosine-schedule offset of both schedulers
    default_size: int = 1024  # the size the weights were trained at


@dataclass
class WuerstchenPipelineOutput:
    images: Any  # list of PIL images, np.ndarray (B, H, W, 3), Tensor (B, 3, H, W), or latents


@dataclass
class PriorOutput:
    image_embeddings: Tensor  # Stage C latents mapped for Stage B: (B, 16, h, w)
    generator: Generator = field(default=None, repr=False)


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"`{name}` is an empty list: give at least one prompt")
        return list(value)
    raise TypeError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}")


def _check_steps(steps: int, custom: Sequence[float] | None, name: str) -> list[float]:
    if custom is not None:
        times = [float(t) for t in custom]
        if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"`{name}` must be at least two strictly decreasing times in [0, 1], e.g. [1.0, 0.5, 0.0]")
        if times[0] > 1 or times[-1] < 0:
            raise ValueError(f"`{name}` must lie in [0, 1]")
        return times
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the number of steps must be an integer ≥ 1, got {steps!r}")
    return timesteps(steps)


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
    """Prior (Stage C) + decoder (Stage B) + VQGAN (Stage A), each with its text encoder."""

    def __init__(
        self,
        prior: StageC | None,
        prior_text_encoder: nn.Module | None,
        prior_tokenizer: Any,
        decoder: StageB | None,
        text_encoder: nn.Module | None,
        tokenizer: Any,
        vqgan: StageA | None,
        settings: PipelineSettings | None = None,
        semantic: nn.Module | None = None,
    ) -> None:
        self.prior = prior
        self.prior_text_encoder = prior_text_encoder
        self.prior_tokenizer = prior_tokenizer
        self.decoder = decoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vqgan = vqgan
        self.semantic = semantic
        self.settings = settings or PipelineSettings()
        self._device = torch.device("cpu")
        self._offload: str | None = None
        self._compiled: dict[str, Callable] = {}
        # CPU inference: in these stages the Linear layers run on oneDNN with their weights packed once
        # per sampling loop and the MLPs' GELU fused in (models/onednn.py), at the cost of one more
        # copy of the stage's Linear weights while it runs. The decoder is left out: its weights are
        # the largest, so packing them raises the generation's peak memory, for little gain.
        self.packed_stages: tuple[str, ...] = ("prior", "vqgan")

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path, prior: str | Path | None = None, **kwargs: Any
    ) -> WuerstchenPipeline:
        """Load a diffusers-format folder or hub id (see `wuerstchen.io.folders.load_pipeline`)."""
        from .io.folders import load_pipeline

        return load_pipeline(path_or_id, prior=prior, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the combined diffusers layout (`prior_prior/`, `decoder/`, `vqgan/`, ...)."""
        from .io.folders import save_pipeline

        save_pipeline(self, folder)

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
        names = ("prior", "prior_text_encoder", "decoder", "text_encoder", "vqgan", "semantic")
        return {n: m for n in names if (m := getattr(self, n)) is not None}

    @property
    def device(self) -> torch.device:
        return self._device

    def to(
        self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> WuerstchenPipeline:
        """Move and/or cast every model, as diffusers allows: `to("cuda")`, `to(torch.bfloat16)`,
        `to("cuda", torch.bfloat16)`."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("pipe.to(dtype) takes one dtype: use pipe.to(device, dtype)")
            device, dtype = None, device
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            check_dtype(dtype, self._device)
        for m in self.modules().values():
            m.to(device=None if self._offload else device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str | None = None) -> None:
        """Keep every model on the CPU and move each to `device` only while it runs (any device)."""
        self._offload = "model"
        self._device = torch.device(device) if device is not None else self._device
        for m in self.modules().values():
            m.to("cpu")

    def enable_sequential_cpu_offload(self, device: torch.device | str | None = None) -> None:
        """Move each layer to `device` only for its own forward: slowest, least memory."""
        self.enable_model_cpu_offload(device)
        self._offload = "sequential"

    def compile(self, freeze: bool | None = None, **options: Any) -> None:
        """Opt-in `torch.compile` (inductor) of the prior, the decoder and the VQGAN's decode; the
        first call at each size pays the compile time (tens of seconds on a CPU).

        `freeze` (default: on unless offloading) is inductor's freezing: the weights become constants
        of the compiled graph, which lets it fold them and pre-pack them for oneDNN, most of the gain
        on a CPU (`wuerstchen bench` measures it). Frozen weights must not be edited in place
        afterwards; replacing modules (a LoRA), `to()` and other sizes compile again by themselves.
        `options` go to `torch.compile` (e.g. `mode="max-autotune"`, which excludes `freeze`).
        """
        if freeze is None:
            freeze = self._offload is None and "mode" not in options
        if freeze:
            options = {**options, "options": {**options.get("options", {}), "freezing": True}}
        self._compiled = {}
        for name in ("prior", "decoder"):
            if getattr(self, name) is not None:
                self._compiled[name] = torch.compile(getattr(self, name), **options)
        if self.vqgan is not None:
            self._compiled["vqgan"] = torch.compile(self.vqgan.decode_latents, **options)

    @contextmanager
    def _placed(self, name: str) -> Iterator[Callable]:
        """Yield the callable for model `name` on the execution device, honouring offload (on a CPU,
        the Linear layers of `packed_stages` run on oneDNN meanwhile, offloaded or not)."""
        with packed_linears(name in self.packed_stages and name not in self._compiled):
            with self._offloaded(name):
                yield self._compiled.get(name, getattr(self, name))

    @contextmanager
    def _offloaded(self, name: str) -> Iterator[None]:
        """Model `name` on the execution device for the block (all of it, or layer by layer)."""
        module = getattr(self, name)
        if self._offload is None:
            yield
            return
        if self._offload == "model":
            module.to(self._device)
            try:
                yield
            finally:
                module.to("cpu")
            return

        def load(m: nn.Module, _args: Any) -> None:
            m.to(self._device)

        def unload(m: nn.Module, _args: Any, _out: Any) -> None:
            m.to("cpu")

        hooks = []
        for leaf in module.modules():
            own = [*leaf.parameters(recurse=False), *leaf.buffers(recurse=False)]
            if own:
                hooks += [leaf.register_forward_pre_hook(load), leaf.register_forward_hook(unload)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            module.to("cpu")

    # ----------------------------------------------------------------------------- sizes
    @property
    def size_step(self) -> int:
        """The image-side step (px) at which every stage's latent sizes are whole numbers:
        128 for the official weights. Sizes are snapped down to a multiple of it."""
        st = self.settings
        stride = self.decoder.config.stride if self.decoder is not None else 1
        down = self.vqgan.config.downscale if self.vqgan is not None else 4
        for k in range(1, 257):
            px = round(k * st.resolution_multiple)
            b_side = int(k * st.latent_dim_scale)
            if math.ceil(px / st.resolution_multiple) == k and b_side % stride == 0 and b_side * down == px:
                return px
        raise ValueError("these pipeline settings admit no image size whose latents fit every stage")

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Snap a size down to the model's step with a warning; refuse one below a single step."""
        step = self.size_step
        out = []
        for name, value in (("height", height), ("width", width)):
            value = self.settings.default_size if value is None else value
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an integer number of pixels, got {value!r}")
            if value < step:
                raise ValueError(
                    f"{name}={value} is too small: this model needs at least {step} px (a multiple of {step})"
                )
            if value % step:
                snapped = value - value % step
                logger.warning("%s=%d is not a multiple of %d px; using %d", name, value, step, snapped)
                value = snapped
            out.append(value)
        return out[0], out[1]

    def prior_latent_size(self, height: int, width: int) -> tuple[int, int]:
        rm = self.settings.resolution_multiple
        return math.ceil(height / rm), math.ceil(width / rm)

    # ----------------------------------------------------------------------------- text
    def _text(self, which: str, prompts: list[str], weighting: bool, warn: bool = True) -> Tensor:
        tokenizer = self.prior_tokenizer if which == "prior" else self.tokenizer
        name = "prior_text_encoder" if which == "prior" else "text_encoder"
        with self._placed(name) as encoder:
            return encode_prompts(tokenizer, encoder, prompts, self._device, weighting, warn)

    def encode_prompt(
        self,
        which: str,
        prompts: list[str],
        negative: list[str] | None,
        cfg: bool,
        repeat: int,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        weighting: bool = True,
    ) -> Tensor:
        """Text states for one stage: (B·repeat, L, D), with the negatives appended when `cfg`."""
        cond = prompt_embeds if prompt_embeds is not None else self._text(which, prompts, weighting)
        cond = cond.to(self._device).repeat_interleave(repeat, dim=0)
        if not cfg:
            return cond
        if negative_prompt_embeds is None:
            batch = cond.shape[0] // repeat
            if negative is None:
                negative = [""] * batch
            elif len(negative) == 1 and batch > 1:
                negative = negative * batch
            elif len(negative) != batch:
                raise ValueError(
                    f"got {len(negative)} negative prompts for {batch} prompts: give one, or one per prompt"
                )
            negative_prompt_embeds = self._text(which, negative, weighting)
        uncond = negative_prompt_embeds.to(self._device).repeat_interleave(repeat, dim=0)
        if uncond.shape != cond.shape:
            raise ValueError(
                f"negative text states {tuple(uncond.shape)} do not match the prompt's {tuple(cond.shape)}"
            )
        return torch.cat([cond, uncond.to(cond.dtype)])

    # ----------------------------------------------------------------------------- stages
    @staticmethod
    def _step_callback(pipe_cb: Callable | None, hook: StepHook | None, stage: str, total: int) -> Callable:
        def callback(i: int, t: float, x: Tensor) -> Tensor | None:
            replaced = None
            if pipe_cb is not None:  # diffusers' callback_on_step_end(pipe, i, t, kwargs) → kwargs
                out = pipe_cb(None, i, torch.tensor(t), {"latents": x}) or {}
                replaced = out.get("latents")
            if hook is not None:
                hook(stage, i + 1, total, x if replaced is None else replaced)
            return replaced

        return callback

    @staticmethod
    def make_generator(generator: Generator, seed: int | None, count: int) -> Generator:
        """`seed` gives image i of the batch the seed `seed + i`, so each can be made again alone."""
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either `seed` or `generator`, not both")
            return [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(count)]
        if isinstance(generator, list) and len(generator) != count:
            raise ValueError(f"got {len(generator)} generators for {count} images: give one per image")
        return generator

    @torch.no_grad()
    def generate_prior(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 60,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        callback_on_step_end: Callable | None = None,
        step_hook: StepHook | None = None,
        sampler: str = "ddpm",
        prompt_weighting: bool = True,
    ) -> PriorOutput:
        """Stage C alone: text → semantic latents, mapped (x·42 − 1) for Stage B."""
        if self.prior is None:
            raise ValueError("this pipeline has no prior (Stage C): load one to generate from text")
        prompts = _as_list(prompt, "prompt")
        negatives = _as_list(negative_prompt, "negative_prompt")
        if prompts is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompts is None and prompt_embeds is None:
            prompts = [""]  # unconditional
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"`num_images_per_prompt` must be an integer ≥ 1, got {num_images_per_prompt!r}")
        height, width = self.check_size(height, width)
        times = _check_steps(num_inference_steps, timesteps, "prior_timesteps")
        cfg = guidance_scale > 1
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        n = batch * num_images_per_prompt
        generator = self.make_generator(generator, seed, n)

        text = self.encode_prompt(
            "prior",
            prompts,
            negatives,
            cfg,
            num_images_per_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_weighting,
        )
        h, w = self.prior_latent_size(height, width)
        shape = (n, self.prior.config.c_in, h, w)
        if latents is None:
            x = randn(shape, generator, self._device, torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        else:
            x = latents.to(self._device, torch.float32)

        with self._placed("prior") as prior:
            dtype = self.prior.projection.weight.dtype
            kv = self.prior.condition(text.to(dtype))  # text K/V once per generation

            def denoise(x: Tensor, r: Tensor) -> Tensor:
                if not cfg:
                    return prior(x.to(dtype), r, kv=kv).float()
                eps_cond, eps_uncond = prior(x.to(dtype), r, kv=kv, copies=2).float().chunk(2)
                return torch.lerp(eps_uncond, eps_cond, guidance_scale)

            callback = self._step_callback(callback_on_step_end, step_hook, "prior", len(times) - 1)
            x = sample(denoise, x, times, sampler=sampler, generator=generator, s=self.settings.s, callback=callback)
        _check_finite(x, "Stage C (prior)")
        st = self.settings
        return PriorOutput(x * st.latent_mean - st.latent_std, generator)

    @torch.no_grad()
    def decode(
        self,
        image_embeddings: Tensor,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 12,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        step_hook: StepHook | None = None,
        sampler: str = "ddpm",
        prompt_weighting: bool = True,
    ) -> WuerstchenPipelineOutput:
        """Stage B + Stage A alone: semantic latents (B, 16, h, w) → images.

        Each semantic latent is decoded `num_images_per_prompt` times; `prompt` is one string or
        one per semantic latent.
        """
        if self.decoder is None or self.vqgan is None:
            raise ValueError("this pipeline has no decoder/VQGAN (Stage B/A): load them to decode")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"`num_images_per_prompt` must be an integer ≥ 1, got {num_images_per_prompt!r}")
        effnet = image_embeddings.to(self._device).repeat_interleave(num_images_per_prompt, dim=0)
        n = effnet.shape[0]
        times = _check_steps(num_inference_steps, timesteps, "decoder_timesteps")
        cfg = guidance_scale > 1
        generator = self.make_generator(generator, seed, n)
        per_latent = image_embeddings.shape[0]
        prompts = _as_list(prompt, "prompt")
        if prompt_embeds is None:
            prompts = prompts or [""]
            if len(prompts) == 1:
                prompts = prompts * per_latent
            if len(prompts) != per_latent:
                raise ValueError(f"got {len(prompts)} prompts for {per_latent} semantic latents")
        negatives = _as_list(negative_prompt, "negative_prompt")
        text = self.encode_prompt(
            "decoder",
            prompts,
            negatives,
            cfg,
            num_images_per_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_weighting,
        )
        st = self.settings
        size = (int(effnet.shape[2] * st.latent_dim_scale), int(effnet.shape[3] * st.latent_dim_scale))
        shape = (n, self.decoder.config.c_in, *size)
        if latents is None:
            x = randn(shape, generator, self._device, torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"decoder `latents` has shape {tuple(latents.shape)}, expected {shape}")
        else:
            x = latents.to(self._device, torch.float32)

        with self._placed("decoder") as decoder:
            dtype = self.decoder.clip_mapper.weight.dtype
            effnet_in = torch.cat([effnet, torch.zeros_like(effnet)]) if cfg else effnet
            cond = self.decoder.condition(effnet_in.to(dtype), text.to(dtype), size)

            def denoise(x: Tensor, r: Tensor) -> Tensor:
                if not cfg:
                    return decoder(x.to(dtype), r, cond=cond).float()
                eps_cond, eps_uncond = (
                    decoder(torch.cat([x, x]).to(dtype), torch.cat([r, r]), cond=cond).float().chunk(2)
                )
                return torch.lerp(eps_uncond, eps_cond, guidance_scale)

            callback = self._step_callback(callback_on_step_end, step_hook, "decoder", len(times) - 1)
            x = sample(denoise, x, times, sampler=sampler, generator=generator, s=st.s, callback=callback)
        _check_finite(x, "Stage B (decoder)")
        if output_type == "latent":
            return WuerstchenPipelineOutput(x)
        images = self.decode_latents(x)
        if step_hook is not None:
            step_hook("vqgan", 1, 1, images)
        return WuerstchenPipelineOutput(to_output(images, output_type))

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Stage A alone: Stage B latents (B, 4, H/4, W/4) → float32 images in [0, 1] (B, 3, H, W)."""
        with self._placed("vqgan") as _:
            decode = self._compiled.get("vqgan", self.vqgan.decode_latents)
            return decode(latents.to(self._device, self.vqgan.out_block[0].weight.dtype)).float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        prior_num_inference_steps: int = 60,
        prior_timesteps: Sequence[float] | None = None,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 12,
        decoder_timesteps: Sequence[float] | None = None,
        decoder_guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        decoder_prompt_embeds: Tensor | None = None,
        decoder_negative_prompt_embeds: Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end: Callable | None = None,
        callback_on_step_end: Callable | None = None,
        step_hook: StepHook | None = None,
        sampler: str = "ddpm",
        prompt_weighting: bool = True,
    ) -> WuerstchenPipelineOutput | tuple:
        """Text → images. Arguments as diffusers' `WuerstchenCombinedPipeline`, plus:

        - `seed`: image i of the batch gets seed `seed + i` (instead of one shared `generator`);
        - `decoder_prompt_embeds` / `decoder_negative_prompt_embeds`: text states for Stage B's
          encoder (`prompt_embeds` are Stage C's), for Compel and similar libraries;
        - `step_hook(stage, step, total, latents)`: progress/preview/cancel (raise to cancel);
        - `sampler`: "ddpm" (the reference) or "ddim" (deterministic);
        - `prompt_weighting`: understand `(word:1.3)` / `[word]` (default on).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        prior = self.generate_prior(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=prior_num_inference_steps,
            timesteps=prior_timesteps,
            guidance_scale=prior_guidance_scale,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            seed=seed,
            latents=latents,
            callback_on_step_end=prior_callback_on_step_end,
            step_hook=step_hook,
            sampler=sampler,
            prompt_weighting=prompt_weighting,
        )
        # The decoder reads the same prompts, encoded once by its own text encoder and repeated for
        # each image of a prompt (diffusers' decoder multiplies a list of prompts twice here).
        n = num_images_per_prompt
        prompts = _as_list(prompt, "prompt") or [""] * (prior.image_embeddings.shape[0] // n)
        # The prior's encoder has warned about these prompts already (unknown words, truncation).
        warn = prompt_embeds is not None
        if decoder_prompt_embeds is None:
            decoder_prompt_embeds = self._text("decoder", prompts, prompt_weighting, warn)
        if decoder_guidance_scale > 1 and decoder_negative_prompt_embeds is None:
            negatives = _as_list(negative_prompt, "negative_prompt") or [""]
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
            decoder_negative_prompt_embeds = self._text("decoder", negatives, prompt_weighting, warn)
        if decoder_negative_prompt_embeds is not None:
            decoder_negative_prompt_embeds = decoder_negative_prompt_embeds.repeat_interleave(n, dim=0)
        out = self.decode(
            prior.image_embeddings,
            num_inference_steps=num_inference_steps,
            timesteps=decoder_timesteps,
            guidance_scale=decoder_guidance_scale,
            prompt_embeds=decoder_prompt_embeds.repeat_interleave(n, dim=0),
            negative_prompt_embeds=decoder_negative_prompt_embeds,
            generator=prior.generator,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            step_hook=step_hook,
            sampler=sampler,
            prompt_weighting=prompt_weighting,
        )
        return out if return_dict else (out.images,)

    def with_settings(self, **changes: Any) -> WuerstchenPipeline:
        self.settings = replace(self.settings, **changes)
        return self
