"""Stable Cascade (Würstchen v3) training: Stage C and Stage B on the one `CascadeUNet`, through the
shared loop (`loop.make_task` picks these tasks when the model is a Stable Cascade U-Net).

    wuerstchen train c --data photos/ --init-from models/stable-cascade --lr 1e-5 --max-steps 2000
    wuerstchen train c --data photos/ --init-from stage_c_lite_bf16.safetensors --pipeline models/stable-cascade \
        --lora-rank 4 --bf16 --gradient-checkpointing

The objective is the official trainer's GDF (Stability-AI/StableCascade `train/train_c.py`,
`train/train_b.py`, `train/train_c_lora.py` `setup_extras_pre`, over `gdf/schedules.py`,
`gdf/scalers.py`, `gdf/targets.py`, `gdf/noise_conditions.py`, `gdf/loss_weights.py`):

- t ~ U(0, 1) (GDF's `diffuse` draws `torch.rand`), schedule shift 1 and loss shift 1;
- `CosineSchedule(clamp_range=[1e-4, 0.9999])`: ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2),
  s = 0.008, clamped (`sampling.alpha_cumprod`);
- `VPScaler`: x_t = √ᾱ·x0 + √(1 − ᾱ)·ε; `EpsilonTarget`: the network predicts ε;
- `CosineTNoiseCond`: the network sees r = the cosine time of the clamped ᾱ (t itself inside the
  clamp range, ~0.006 and ~0.994 at its ends);
- loss: each sample's MSE (mean over C, H, W) times `P2LossWeight` (k = γ = s = 1): (1 + SNR)⁻¹ =
  1 − ᾱ, the code's default and the LoRA recipe's; or `AdaptiveLossWeight` (`--loss-weighting
  adaptive`, the full fine-tune configs' `adaptive_loss_weight: True`): 300 buckets over log SNR ∈
  [−10, 10], weight 1 / the bucket's running loss, clamped to [1e-7, 1e7], the buckets updated after
  each forward with the unweighted losses (β 0.99).

Conditions as the official `DataCore.get_conditions` and `train_b.get_conditions` make them:
- Stage C: CLIP-G token states (`hidden_states[-1]`) and pooled, projected embedding (B, 1, D) of
  the caption, the caption dropped (empty) for 5% (`--caption-drop`), the same caption for both; the
  CLIP image embedding (B, 1, D_img) zeros, except for 10% of samples (`--image-embed-rate`), which get
  their image's (resized to 224 bicubic, centre-cropped, CLIP-normalised) when the sources have an
  image encoder. The latent is the semantic compressor's output as it is (v3 has no (x + 1)/42).
- Stage B: the Stage A latent of the image; the semantic latent of the image resized (nearest) by a
  factor U(0.5, 1) floored to the compressor's stride, zeroed for 10% (`--semantic-drop`); the pooled
  embedding of the caption, dropped 5%. `sca`/`crp` and Stage B's pixels are zeros, as there.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..models.cascade import CASCADE_PRESETS, CascadeUNet
from ..models.config import read_json
from ..models.text import encode_prompts_pooled
from ..sampling import alpha_cumprod
from .config import StageBTrainConfig, StageCTrainConfig, TrainConfig
from .frozen import load_frozen_parts
from .stages import Batch, StageBTask, StageCTask, Task

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the official clip_preprocess's Normalize
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- GDF objective


def gdf_r(ab: Tensor, s: float = 0.008) -> Tensor:
    """`CosineTNoiseCond`: the time whose (unclamped) cosine ᾱ is `ab`: the r the network sees."""
    init = math.cos(s / (1 + s) * math.pi * 0.5) ** 2
    return ((ab * init).sqrt().acos() / (math.pi * 0.5)) * (1 + s) - s


class AdaptiveLossWeight(nn.Module):
    """GDF's `AdaptiveLossWeight`: per log-SNR bucket, the running mean of the unweighted loss; a
    sample's weight is its bucket's 1 / running loss. The buckets are a buffer, so checkpoints (and
    exact resume) hold them; under DDP/FSDP every rank updates them with the whole global micro-batch."""

    def __init__(self, buckets: int = 300, logsnr_range: tuple[float, float] = (-10.0, 10.0),
                 weight_range: tuple[float, float] = (1e-7, 1e7), beta: float = 0.99) -> None:  # fmt: skip
        super().__init__()
        self.edges = torch.linspace(*logsnr_range, buckets - 1)  # a constant, not state
        self.register_buffer("bucket_losses", torch.ones(buckets))
        self.weight_range, self.beta = weight_range, beta

    def _index(self, logsnr: Tensor) -> Tensor:
        return torch.searchsorted(self.edges.to(logsnr.device), logsnr.float())

    def forward(self, logsnr: Tensor) -> Tensor:
        return (1 / self.bucket_losses[self._index(logsnr)]).clamp(*self.weight_range)

    @torch.no_grad()
    def update(self, logsnr: Tensor, loss: Tensor) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.stack([logsnr.float(), loss.float()])
            gathered = [torch.empty_like(both) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, both)
            logsnr, loss = torch.cat(gathered, dim=1)
        idx = self._index(logsnr)
        # As GDF's indexed assignment: for a bucket hit twice in one batch, the last sample's update wins.
        self.bucket_losses[idx] = self.bucket_losses[idx] * self.beta + loss.float() * (1 - self.beta)


class CascadeLoss(nn.Module):
    """The GDF ε loss of a Stable Cascade U-Net; `conditions` are the U-Net's keyword arguments
    (Stage C: clip_text (B, 77, D), clip_text_pooled (B, 1, D'), clip_img (B, 1, D_img); Stage B:
    clip_text_pooled, effnet (B, 16, h, w))."""

    def __init__(self, model: CascadeUNet, weighting: str = "p2") -> None:
        super().__init__()
        self.model = model
        self.weighting = weighting
        self.adaptive = AdaptiveLossWeight() if weighting == "adaptive" else None

    def forward(self, x0: Tensor, noise: Tensor, t: Tensor, **conditions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ab = alpha_cumprod(t.float()).view(-1, *[1] * (x0.dim() - 1))
        x_t = ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float()
        pred = self.model(x_t, gdf_r(ab.flatten()), **conditions)
        per_sample = (pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
        logsnr = (ab / (1 - ab)).log().flatten()
        if self.adaptive is not None:
            weight = self.adaptive(logsnr)
            self.adaptive.update(logsnr, per_sample.detach())
        elif self.weighting == "p2":
            weight = 1 / (1 + logsnr.exp())  # P2LossWeight: (k + SNR)^-γ, k = γ = 1
        else:
            weight = torch.ones_like(per_sample)
        return (per_sample * weight).mean(), {}


# ----------------------------------------------------------------------------- which generation


def is_cascade(cfg: TrainConfig) -> bool:
    """Whether `cfg` trains a Stable Cascade U-Net: a Stable Cascade preset or config (--model), an
    official single file (--init-from FILE), or a folder whose component is a StableCascadeUNet."""
    spec = cfg.model
    if isinstance(spec, str) and spec in CASCADE_PRESETS:
        return True
    if isinstance(spec, str) and Path(spec).is_file():
        spec = read_json(spec)
    if isinstance(spec, dict):
        return "block_out_channels" in spec
    if not cfg.init_from or cfg.stage not in ("b", "c"):
        return False
    if Path(cfg.init_from).is_file():
        return True
    from ..io.folders import resolve_folder

    root = resolve_folder(cfg.init_from)
    names = ("prior_prior", "prior") if cfg.stage == "c" else ("decoder",)
    for name in names:
        if (root / name / "config.json").is_file():
            return read_json(root / name / "config.json").get("_class_name") == CascadeUNet.diffusers_class
    return False


# ----------------------------------------------------------------------------- tasks


def _text_width_check(width: int | None, expected: int | None, what: str) -> None:
    if width is not None and expected is not None and width != expected:
        raise UserError(f"the text encoder gives {width}-wide {what}; this Stable Cascade model expects {expected}")


class CascadePriorTask(StageCTask):
    """Stage C of Stable Cascade: text states + pooled text (+ image embeddings) → semantic latent."""

    model_class = CascadeUNet

    def __init__(self, cfg: StageCTrainConfig, device: torch.device, allow_pipe_urls: bool = False) -> None:
        Task.__init__(self, cfg, device, allow_pipe_urls)
        cached = bool(cfg.cache) and Path(cfg.cache).exists()
        self.frozen = load_frozen_parts(cfg, device, self.component, text=("prior_", ""), semantic=not cached)
        others = self.frozen.others
        self.image_encoder = others.get("image_encoder") if cfg.image_embed_rate > 0 and not cfg.cache else None
        if self.image_encoder is not None:
            self.image_encoder = self.image_encoder.to(device).eval().requires_grad_(False)
            processor = others.get("feature_extractor")
            crop = getattr(processor, "crop_size", None) or {"height": 224, "width": 224}
            self.image_side = (crop["height"], crop["width"])
        elif cfg.image_embed_rate > 0:
            self.note("no image encoder in the sources (or --cache): every sample's image embedding is zeros")
        self.cache = None
        if cfg.cache:
            from .cache import build_cache, ensure_cache, fingerprint

            st, semantic = self.frozen.settings, self.frozen.semantic
            path, expected = Path(cfg.cache), fingerprint(cfg, st.resolution_multiple, pooled=True)

            def build() -> None:
                build_cache(path, self.source, self.encode_pooled,
                            lambda images: semantic.encode(images, size=st.prior_side(images.shape[-2:])),
                            self.device, cfg, expected)  # fmt: skip

            self.cache = ensure_cache(path, expected, build)
            self.frozen = dataclasses.replace(self.frozen, semantic=None)
        self.module = CascadeLoss(self.build_model(), cfg.loss_weighting).to(device)
        mc, tc = self.model_config, self.frozen.text_encoder.config
        _text_width_check(getattr(tc, "hidden_size", None), mc.clip_text_in_channels, "token states")
        _text_width_check(getattr(tc, "projection_dim", None), mc.clip_text_pooled_in_channels, "pooled states")

    def encode_pooled(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions → (B, 77, D) token states and (B, 1, D') pooled embeddings, float32."""
        f = self.frozen
        states, pooled = encode_prompts_pooled(f.tokenizer, f.text_encoder, captions, self.device, weighting=False)
        return states.float(), pooled.float()

    @torch.no_grad()
    def image_embeds(self, images: Tensor, use: Tensor) -> Tensor:
        """(B, 1, D_img): zeros, and the CLIP image embedding of the images where `use` (B,) is set."""
        width = self.model_config.clip_image_in_channels
        out = torch.zeros(images.shape[0], 1, width, device=self.device)
        if self.image_encoder is not None and bool(use.any()):
            x = images[use].float()
            side = min(self.image_side)
            scale = side / min(x.shape[-2:])  # shorter side to the crop size, then a centre crop
            size = (max(side, round(x.shape[-2] * scale)), max(side, round(x.shape[-1] * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            top, left = (size[0] - self.image_side[0]) // 2, (size[1] - self.image_side[1]) // 2
            x = x[..., top : top + self.image_side[0], left : left + self.image_side[1]]
            x = (x - x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
            dtype = next(self.image_encoder.parameters()).dtype
            out[use] = self.image_encoder(x.to(dtype)).image_embeds.float()[:, None]
        return out

    def prepare(self, batch: Batch, generator: torch.Generator, step: int) -> dict[str, Any]:
        cfg: StageCTrainConfig = self.cfg  # type: ignore[assignment]
        n, dev = len(batch["caption"]), generator.device
        drop = torch.rand(n, generator=generator, device=dev) < cfg.caption_drop
        use_image = torch.rand(n, generator=generator, device=dev) < cfg.image_embed_rate
        st = self.frozen.settings
        if self.cache is not None:  # precomputed text states, pooled embeddings and semantic latents
            text = batch["text"].to(self.device, torch.float32)
            pooled = batch["pooled"].to(self.device, torch.float32)
            text[drop] = self.cache.empty_text.to(self.device, torch.float32)
            pooled[drop] = self.cache.empty_pooled.to(self.device, torch.float32)
            x0 = batch["semantic"].to(self.device, torch.float32)
            image = torch.zeros(n, 1, self.model_config.clip_image_in_channels, device=self.device)
        else:
            images = batch["image"].to(self.device)
            text, pooled = self.encode_pooled(["" if d else c for c, d in zip(batch["caption"], drop.tolist(),
                                                                              strict=True)])  # fmt: skip
            x0 = self.frozen.semantic.encode(images, size=st.prior_side(images.shape[-2:])).float()
            image = self.image_embeds(images, use_image.to(self.device))
        t = torch.rand(n, generator=generator, device=dev)  # GDF: t ~ U(0, 1)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        return dict(x0=x0, noise=noise, t=t, clip_text=text, clip_text_pooled=pooled, clip_img=image)


class CascadeDecoderTask(StageBTask):
    """Stage B of Stable Cascade: semantic latent + pooled text → Stage A latent."""

    model_class = CascadeUNet

    def __init__(self, cfg: StageBTrainConfig, device: torch.device, allow_pipe_urls: bool = False) -> None:
        Task.__init__(self, cfg, device, allow_pipe_urls)
        if cfg.train_semantic:
            raise UserError("--train-semantic is Würstchen v1/v2's recipe; Stable Cascade's decoder reads a "
                            "frozen EfficientNet: leave it out")  # fmt: skip
        self.frozen = load_frozen_parts(cfg, device, self.component, text=("", "prior_"), vqgan=True, semantic=True)
        self.frozen_semantic = self.frozen.semantic
        self.module = CascadeLoss(self.build_model(), cfg.loss_weighting).to(device)
        tc = self.frozen.text_encoder.config
        pooled_width = self.model_config.clip_text_pooled_in_channels
        _text_width_check(getattr(tc, "projection_dim", None), pooled_width, "pooled states")

    def prepare(self, batch: Batch, generator: torch.Generator, step: int) -> dict[str, Any]:
        cfg: StageBTrainConfig = self.cfg  # type: ignore[assignment]
        images = batch["image"].to(self.device)
        n, (h, w), dev = images.shape[0], images.shape[-2:], generator.device
        drop = torch.rand(n, generator=generator, device=dev) < cfg.caption_drop
        keep = (torch.rand(n, generator=generator, device=dev) >= cfg.semantic_drop).float().to(self.device)
        u = float(torch.rand((), generator=generator, device=dev))
        scale = cfg.semantic_scale_min + (1 - cfg.semantic_scale_min) * u
        stride = self.frozen_semantic.config.stride
        px = (max(1, int(h * scale) // stride) * stride, max(1, int(w * scale) // stride) * stride)
        # The official resize is nearest; the compressor then sees the image at that size.
        effnet = self.frozen_semantic(F.interpolate(images.float(), size=px, mode="nearest")).float()
        f = self.frozen
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)]
        pooled = encode_prompts_pooled(f.tokenizer, f.text_encoder, captions, self.device, weighting=False)[1]
        x0 = self.frozen.vqgan.encode_latents(images).float()
        t = torch.rand(n, generator=generator, device=dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        return dict(x0=x0, noise=noise, t=t, clip_text_pooled=pooled.float(), effnet=effnet * keep.view(-1, 1, 1, 1))

    def live_models(self, module: nn.Module) -> dict[str, nn.Module]:
        return {self.component: module.model}


CASCADE_TASKS: dict[str, type[Task]] = {"b": CascadeDecoderTask, "c": CascadePriorTask}
