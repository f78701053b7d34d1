"""What differs between the stages' training, one *task* per stage; `loop.py` runs them all with one loop.

Each task builds a *loss module* (an `nn.Module` whose `forward` returns `(loss, metrics)`: the thing
DDP/FSDP wrap, EMA tracks and checkpoints hold), prepares its inputs from a batch with the frozen
networks (`frozen.py` loads them), writes samples, and exports diffusers-format folders.

- Stage C: ε-prediction on the semantic latent `(x + 1) / 42` of the frozen compressor, text states
  of a frozen CLIP text model, captions dropped 5%.
- Stage B: ε-prediction on the frozen VQGAN's latents, conditioned on the semantic latent of the
  image downscaled by a random factor (zeroed 10%) and on text (dropped 5%).
- Stage A: VQGAN reconstruction + codebook/commitment loss, optional patch-GAN hinge loss.
- Stable Cascade's Stage C and Stage B: `cascade.py` (the official GDF objective and v3 conditions).

Diffusion losses follow the official code (docs/training.md): t = (1 − u)·1.08 + 0.001
clamped to [0.001, 1], per-sample mean squared error of ε, weighted by p2: 1 / (1 + ᾱ/(1 − ᾱ)).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..errors import UserError
from ..io.checkpoint import atomic_path, build_from_state
from ..models.config import config_from_dict, read_json
from ..models.semantic import SemanticCompressor
from ..models.stage_a import StageA
from ..models.stage_b import StageB
from ..models.stage_c import StageC
from ..models.text import encode_prompts
from ..parts import PRIOR_V2
from ..pipeline import WuerstchenPipeline, to_output
from ..sampling import add_noise, alpha_cumprod
from .config import StageATrainConfig, StageBTrainConfig, StageCTrainConfig, TrainConfig
from .data import FolderDataset, WebDatasetSource, make_loader
from .frozen import PIPELINE_PARTS, FrozenParts, load_frozen_parts

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


# ----------------------------------------------------------------------------- diffusion objective


def sample_t(n: int, generator: torch.Generator) -> Tensor:
    """Training times (n,): (1 − u)·1.08 + 0.001 clamped to [0.001, 1] (~7% land exactly on t = 1)."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return ((1 - u) * 1.08 + 0.001).clamp(0.001, 1.0)


def p2_weight(t: Tensor) -> Tensor:
    """p2 loss weight (k = γ = 1) 1 / (1 + ᾱ/(1 − ᾱ)), i.e. 1 − ᾱ: less weight on low-noise steps."""
    ab = alpha_cumprod(t)
    return 1 / (1 + ab / (1 - ab))


def diffusion_loss(pred: Tensor, noise: Tensor, t: Tensor, weighting: str = "p2", x0_weight: float = 0.0) -> Tensor:
    """Mean over the batch of each sample's mean squared ε error (in float32), p2-weighted (the
    official loss) or, with `weighting="uniform"`, not weighted; plus `x0_weight` times the
    squared error of the x0 estimate that ε implies, ‖x̂0 − x0‖² = ‖ε̂ − ε‖²·(1 − ᾱ)/ᾱ.

    Why the x0 term: near t = 1 the noisy latent says nothing about x0, so the layout sampling
    starts from is E[x0 | text], and there the ε loss weighs an x0 error by ᾱ/(1 − ᾱ) (1e-4 at
    t = 1), too little for a small prior to learn it (the README's synthetic task: learnt with
    `x0_weight` 0.1, not without; on the shapes world it did not make the prior read relations)."""
    per_sample = (pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
    weight = p2_weight(t) if weighting == "p2" else torch.ones_like(per_sample)
    if x0_weight:
        ab = alpha_cumprod(t)
        weight = weight + x0_weight * (1 - ab) / ab
    return (per_sample * weight).mean()


# ----------------------------------------------------------------------------- loss modules


def _v2_weighting(weighting: str) -> str:
    if weighting not in ("p2", "uniform"):
        raise UserError(f"--loss-weighting {weighting} is Stable Cascade's (GDF); Würstchen v2 takes p2 or uniform")
    return weighting


class PriorLoss(nn.Module):
    """Stage C: x0 (B, 16, h, w) semantic latents, text (B, 77, c_cond)."""

    def __init__(self, prior: StageC, weighting: str = "p2", x0_weight: float = 0.0) -> None:
        super().__init__()
        _v2_weighting(weighting)
        self.model = prior
        self.weighting = weighting
        self.x0_weight = x0_weight

    def forward(self, x0: Tensor, noise: Tensor, t: Tensor, text: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pred = self.model(add_noise(x0, noise, t), t, text)
        return diffusion_loss(pred, noise, t, self.weighting, self.x0_weight), {}


class ReconstructionHead(nn.Module):
    """Training-only head: the semantic latent (B, 16, h, w) → the VQGAN latent (B, 4, H, W). Its
    loss gives a jointly trained compressor a direct reason to keep what the image shows (shape,
    not only colour and place), which the decoder's ε loss alone teaches weakly."""

    def __init__(self, c_in: int = 16, c_out: int = 4, c: int = 96) -> None:
        super().__init__()
        self.low = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU())
        self.high = nn.Sequential(
            nn.Conv2d(c, c // 2, 3, padding=1), nn.GELU(), nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(c // 2, c_out, 1),
        )  # fmt: skip

    def forward(self, latent: Tensor, size: tuple[int, int]) -> Tensor:
        return self.high(F.interpolate(self.low(latent), size=size, mode="bilinear", align_corners=False))


class DecoderLoss(nn.Module):
    """Stage B: x0 (B, 4, H/4, W/4) VQGAN latents; the semantic latent is given (frozen compressor)
    or computed here from `effnet_images` (compressor trained jointly, optionally with a
    reconstruction loss of weight `recon` through a ReconstructionHead)."""

    def __init__(
        self, decoder: StageB, semantic: SemanticCompressor | None = None, weighting: str = "p2", recon: float = 0.0
    ) -> None:
        super().__init__()
        _v2_weighting(weighting)
        self.model = decoder
        self.semantic = semantic
        self.weighting = weighting
        self.recon = recon
        self.head = (
            ReconstructionHead(semantic.config.c_out, decoder.config.c_in)
            if semantic is not None and recon > 0
            else None
        )

    def forward(
        self,
        x0: Tensor,
        noise: Tensor,
        t: Tensor,
        text: Tensor,
        keep: Tensor,
        effnet: Tensor | None = None,
        effnet_images: Tensor | None = None,
        effnet_side: tuple[int, int] = (1, 1),
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logs: dict[str, Tensor] = {}
        extra: Tensor | float = 0.0
        if self.semantic is not None:
            effnet = self.semantic.encode(effnet_images, size=effnet_side)
            if self.head is not None:
                recon = F.mse_loss(self.head(effnet, x0.shape[-2:]).float(), x0.float())
                extra, logs["recon"] = self.recon * recon, recon.detach()
        effnet = effnet * keep.view(-1, 1, 1, 1)  # the condition zeroed for some samples
        pred = self.model(add_noise(x0, noise, t), t, effnet, text)
        loss = diffusion_loss(pred, noise, t, self.weighting)
        return loss + extra, logs | ({"eps": loss.detach()} if logs else {})


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: (B, 3, H, W) → (B, 1, H/8, W/8) realness logits. GroupNorm, not BatchNorm,
    so it has no running statistics and can be called with borrowed (detached) weights."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.GroupNorm(8, 4 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 1, 3, 1, 1),
        )  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2 - 1)


class VQGANLoss(nn.Module):
    """Stage A: reconstruction + vq_weight · (codebook + commitment), + an optional hinge GAN.

    Generator and discriminator train in one backward pass: the discriminator loss sees the
    reconstruction detached, and the generator's adversarial term calls the discriminator with
    detached weights (`functional_call`), so neither loss's gradient reaches the other network.
    """

    def __init__(
        self,
        vqgan: StageA,
        discriminator: PatchDiscriminator | None = None,
        recon: str = "mse",
        vq_weight: float = 1.0,
        adv_weight: float = 0.1,
    ) -> None:
        super().__init__()
        self.model = vqgan
        self.discriminator = discriminator
        self.recon, self.vq_weight, self.adv_weight = recon, vq_weight, adv_weight

    def forward(self, images: Tensor, adversarial: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        out, vq = self.model(images)
        out = out.float()
        rec = F.mse_loss(out, images) if self.recon == "mse" else F.l1_loss(out, images)
        loss = rec + self.vq_weight * vq.float()
        metrics = {"recon": rec.detach(), "vq": vq.detach().float()}
        disc = self.discriminator
        if disc is not None:
            d_loss = F.relu(1 - disc(images)).mean() + F.relu(1 + disc(out.detach())).mean()
            loss = loss + d_loss
            metrics["d_loss"] = d_loss.detach().float()
            if adversarial:
                weights = {k: v.detach() for k, v in disc.named_parameters()}
                g_adv = -torch.func.functional_call(disc, weights, (out,)).mean()
                loss = loss + self.adv_weight * g_adv
                metrics["g_adv"] = g_adv.detach().float()
        return loss, metrics


# ----------------------------------------------------------------------------- data


def training_data(
    cfg: TrainConfig, allow_pipe_urls: bool = False
) -> tuple[FolderDataset | WebDatasetSource, list[Batch]]:
    """The source to train on, and the images for samples and evaluation: --eval-data, or the
    folder's last --holdout items (which training then never sees)."""
    if not cfg.data:
        raise UserError("give --data: an image folder (image + same-named .txt caption) or webdataset shards")
    opts = dict(random_crop=cfg.random_crop, flip=cfg.flip, bucket_multiple=cfg.bucket_multiple)
    path = Path(cfg.data)
    if path.is_dir():
        source = FolderDataset(path, cfg.image_size, **opts)
        if len(source) <= cfg.holdout:
            raise UserError(f"{path}: {len(source)} captioned images, not enough beyond --holdout {cfg.holdout}")
    elif any(s in cfg.data for s in (".tar", "{", "::", "pipe:", "://")):
        if "pipe:" in cfg.data and not allow_pipe_urls:
            # webdataset runs a `pipe:` URL as a shell command: never on the word of a config file or
            # of a resumed run's config.json, only on the user's own command line.
            raise UserError(f"--data {cfg.data!r} runs a shell command (pipe:): pass --allow-pipe-urls on the "
                            "command line if you mean it")  # fmt: skip
        source = WebDatasetSource(cfg.data, cfg.image_size, **opts)
    else:
        raise FileNotFoundError(f"data folder {path} does not exist")
    if cfg.eval_data:
        if not Path(cfg.eval_data).is_dir():
            raise FileNotFoundError(f"--eval-data folder {cfg.eval_data} does not exist")
        data = FolderDataset(cfg.eval_data, cfg.image_size)
        return source, [data[i] for i in range(min(len(data), 16))]
    if cfg.holdout and isinstance(source, FolderDataset):
        return source.split_holdout(cfg.holdout)
    if cfg.holdout:
        logger.info("--holdout needs an image folder; for shards give --eval-data FOLDER")
    return source, []


# ----------------------------------------------------------------------------- tasks


class Task:
    """What differs between the stages' training. Subclasses set `component` (the pipeline attribute
    they train: prior, decoder, vqgan) and `model_class`; their `__init__` loads `self.frozen` (one
    `load_frozen_parts` call, for the parts they read) and builds `self.module` (the loss module)."""

    component = "?"
    model_class: type[nn.Module] = nn.Module

    def __init__(self, cfg: TrainConfig, device: torch.device, allow_pipe_urls: bool = False) -> None:
        self.cfg, self.device = cfg, device
        self.notes: set[str] = set()  # things said once (e.g. why samples are skipped)
        self.source, self.eval_items = training_data(
            cfg, allow_pipe_urls
        )  # first: a wrong --data is reported before any loading
        self.frozen: FrozenParts
        self.module: nn.Module

    # -- pieces -------------------------------------------------------------------------------
    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.add(message)
            logger.info(message)

    def build_model(self) -> nn.Module:
        """The trained network: from --init-from, or built from --model (a preset, file or object)."""
        cfg, cls = self.cfg, self.model_class
        if cfg.init_from:
            model = self.frozen.init_model
            if model is None:
                raise UserError(f"--init-from {cfg.init_from} holds no {self.component} to fine-tune")
            if cfg.model is not None and self._model_config() != model.config:
                raise UserError("--model differs from the architecture of --init-from: leave --model out")
            self.model_config = model.config
            return model.float().to(self.device).train().requires_grad_(True)
        self.model_config = self._model_config()
        return _official_init(cls(self.model_config)).to(self.device).train()

    def _model_config(self) -> Any:
        spec = self.cfg.model
        cls = self.model_class.config_class
        if spec is None:
            names = ", ".join(self.cfg.model_presets())
            raise UserError(f"give --model PRESET ({names}) or a config file, or --init-from PIPELINE")
        if isinstance(spec, dict):
            return config_from_dict(cls, spec, source="--model")
        if spec in self.cfg.model_presets():
            return self.cfg.model_presets()[spec]
        return config_from_dict(cls, read_json(spec), source=spec)

    def check_text_width(self, expected: int, model: str) -> None:
        width = getattr(self.frozen.text_encoder.config, "hidden_size", None)
        if width is not None and width != expected:
            raise UserError(f"the text encoder gives {width}-wide states; this {model} expects {expected}")

    def encode_captions(self, captions: list[str]) -> Tensor:
        """Captions → the frozen text encoder's states, as training sees them (no prompt weighting)."""
        return encode_prompts(self.frozen.tokenizer, self.frozen.text_encoder, captions, self.device, weighting=False)

    def encode_text(self, captions: list[str], drop: Tensor) -> Tensor:
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        return self.encode_captions(captions).float()

    def pipeline(self, **ours: Any) -> WuerstchenPipeline:
        """A whole pipeline of the sources' parts, with `ours` (pipeline attribute → part) in their place."""
        parts = {name: self.frozen.others.get(name) for name in PIPELINE_PARTS} | ours
        return WuerstchenPipeline(**parts, settings=self.frozen.settings)

    # -- data ---------------------------------------------------------------------------------
    def loader(self, rank: int, world_size: int):
        cfg = self.cfg
        return make_loader(
            self.source, cfg.batch_size, cfg.num_workers, cfg.seed, rank=rank, world_size=world_size,
            pin_memory=self.device.type == "cuda",
        )  # fmt: skip

    def remember(self, batch: Batch) -> None:
        """Without evaluation images, the first training batch's first items serve for samples."""
        if not self.eval_items:
            keys = [k for k in ("image", "caption") if k in batch]
            self.eval_items = [{k: batch[k][i] for k in keys} for i in range(min(4, len(batch["caption"])))]

    # -- per task -----------------------------------------------------------------------------
    def prepare(self, batch: Batch, generator: torch.Generator, step: int) -> dict[str, Any]:
        """A batch → the loss module's keyword arguments (frozen encoders, random draws)."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        self.module.model.gradient_checkpointing = True

    def components(self, state: dict[str, Tensor]) -> dict[str, nn.Module]:
        """Plain models (name → module) built from a full loss-module state dict, for export."""
        comps = {self.component: build_from_state(self.model_class, self.model_config, _strip(state, "model."), "run")}
        return comps

    def live_models(self, module: nn.Module) -> dict[str, nn.Module]:
        """The trained models inside the (unwrapped) loss module, as `components` names them."""
        return {self.component: module.model}

    def assemble(self, models: dict[str, nn.Module]) -> WuerstchenPipeline | None:
        """A whole pipeline with `models` in place of the sources' parts; None if parts are missing."""
        return None

    def sample(self, models: dict[str, nn.Module], path: Path) -> dict[str, float]:
        """Write sample images to `path` (PNG) with the trained `models`; return metrics to log."""
        return {}


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def _official_init(model: nn.Module) -> nn.Module:
    """The official from-scratch initialisation's key parts: the output head is zeroed, so the noise
    estimate starts as a well-conditioned function of x_t (Stage C: (x − 0)/|1 − 0|; Stage B:
    (x − 0)/sigmoid(0)) instead of dividing by a random |1 − b| near 0, and the timestep
    modulations start as the identity."""
    from ..models.blocks import TimestepBlock

    head = getattr(model, "out", None) or getattr(model, "clf", None)
    if head is not None:
        nn.init.zeros_(head[1].weight)
        nn.init.zeros_(head[1].bias)
    for m in model.modules():
        if isinstance(m, TimestepBlock):
            nn.init.zeros_(m.mapper.weight)
    return model


def save_grid(rows: list[list[Image.Image]], path: Path) -> None:
    """Rows of equally sized images → one PNG, written atomically."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    path.chmod(0o644)  # the temporary file was private


def _images(items: list[Batch], device: torch.device) -> Tensor:
    return torch.stack([item["image"] for item in items]).to(device)


def _step_ok(task: Task, pipe: WuerstchenPipeline) -> bool:
    step = pipe.size_step
    if task.cfg.image_size % step:
        task.note(f"no samples: --image-size {task.cfg.image_size} is not a multiple of the pipeline's {step} px")
        return False
    return True


# ----------------------------------------------------------------------------- Stage C


class StageCTask(Task):
    component, model_class = "prior", StageC

    def __init__(self, cfg: StageCTrainConfig, device: torch.device, allow_pipe_urls: bool = False) -> None:
        super().__init__(cfg, device, allow_pipe_urls)
        cached = bool(cfg.cache) and Path(cfg.cache).exists()  # then the semantic compressor is not needed
        self.frozen = load_frozen_parts(cfg, device, self.component, text=("prior_", ""), semantic=not cached)
        self.cache = None
        if cfg.cache:
            from .cache import build_cache, ensure_cache, fingerprint

            st, semantic = self.frozen.settings, self.frozen.semantic
            path, expected = Path(cfg.cache), fingerprint(cfg, st.resolution_multiple)

            def build() -> None:
                build_cache(path, self.source, self.encode_captions,
                            lambda images: semantic.encode(images, size=st.prior_side(images.shape[-2:])),
                            self.device, cfg, expected)  # fmt: skip

            self.cache = ensure_cache(path, expected, build)
            self.frozen = dataclasses.replace(self.frozen, semantic=None)  # the cache holds its latents now
        self.module = PriorLoss(self.build_model(), cfg.loss_weighting, cfg.x0_weight).to(device)
        self.check_text_width(self.model_config.c_cond, "prior")

    def loader(self, rank: int, world_size: int):
        if self.cache is not None:
            from .cache import cache_loader

            return cache_loader(self.cache, self.cfg.batch_size, self.cfg.seed, rank, world_size)
        return super().loader(rank, world_size)

    def prepare(self, batch: Batch, generator: torch.Generator, step: int) -> dict[str, Any]:
        n = len(batch["caption"])
        drop = torch.rand(n, generator=generator, device=generator.device) < self.cfg.caption_drop
        st = self.frozen.settings
        if self.cache is not None:  # precomputed: (B, 77, D) text states, (B, 16, h, w) semantic latents
            text = batch["text"].to(self.device, torch.float32)
            text[drop] = self.cache.empty_text.to(self.device, torch.float32)
            semantic = batch["semantic"].to(self.device, torch.float32)
        else:
            images = batch["image"].to(self.device)
            text = self.encode_text(batch["caption"], drop)
            semantic = self.frozen.semantic.encode(images, size=st.prior_side(images.shape[-2:])).float()
        x0 = PRIOR_V2.from_decoder(semantic, st)  # the prior's space; sampled latents map back x·42 − 1
        t = sample_t(n, generator)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        return dict(x0=x0, noise=noise, t=t, text=text)

    def assemble(self, models: dict[str, nn.Module]) -> WuerstchenPipeline | None:
        f = self.frozen
        if any(f.others.get(n) is None for n in ("decoder", "vqgan", "text_encoder", "tokenizer")):
            return None
        # With a cache the compressor was not kept: the sources' one (if any) goes with the pipeline.
        semantic = f.others.get("semantic") if self.cache else f.semantic if f.semantic_shipped else None
        return self.pipeline(prior=models["prior"], prior_text_encoder=f.text_encoder, prior_tokenizer=f.tokenizer,
                             semantic=semantic)  # fmt: skip

    def sample(self, models: dict[str, nn.Module], path: Path) -> dict[str, float]:
        pipe = self.assemble(models)
        if pipe is None:
            self.note("no Stage C samples: they need a decoder and VQGAN from --init-from or --pipeline")
            return {}
        if not _step_ok(self, pipe):
            return {}
        prompts = list(self.cfg.sample_prompts) or [item["caption"] for item in self.eval_items[:4]] or [""]
        pipe.to(self.device)
        size = self.cfg.image_size
        images = pipe(
            prompts, height=size, width=size, prior_num_inference_steps=self.cfg.sample_steps,
            num_inference_steps=min(12, self.cfg.sample_steps), seed=self.cfg.seed, prompt_weighting=False,
        ).images  # fmt: skip
        save_grid([images], path)
        return {}


# ----------------------------------------------------------------------------- Stage B


class StageBTask(Task):
    component, model_class = "decoder", StageB

    def __init__(self, cfg: StageBTrainConfig, device: torch.device, allow_pipe_urls: bool = False) -> None:
        super().__init__(cfg, device, allow_pipe_urls)
        self.frozen = load_frozen_parts(cfg, device, self.component, text=("",), vqgan=True, semantic=True)
        # With --train-semantic the loaded compressor is where training starts: the loss module owns it.
        trained = self.frozen.semantic.train().requires_grad_(True) if cfg.train_semantic else None
        self.frozen_semantic = None if cfg.train_semantic else self.frozen.semantic
        self.module = DecoderLoss(self.build_model(), trained, cfg.loss_weighting, cfg.semantic_recon).to(device)
        self.check_text_width(self.model_config.clip_embd, "decoder")

    def prepare(self, batch: Batch, generator: torch.Generator, step: int) -> dict[str, Any]:
        cfg: StageBTrainConfig = self.cfg  # type: ignore[assignment]
        images = batch["image"].to(self.device)
        n, (h, w) = images.shape[0], images.shape[-2:]
        dev = generator.device
        drop = torch.rand(n, generator=generator, device=dev) < cfg.caption_drop
        keep = (torch.rand(n, generator=generator, device=dev) >= cfg.semantic_drop).float()
        # One random downscale per batch (latents in a batch share a shape): the compressor sees the
        # image at a factor U(min, 1) of its side, floored to its stride (32 px); Stable Cascade's
        # recipe. 1024 px → 16..32 semantic tokens a side, around the 24 Stage C makes for 1024 px.
        u = float(torch.rand((), generator=generator, device=dev))
        scale = cfg.semantic_scale_min + (1 - cfg.semantic_scale_min) * u
        stride = (self.frozen_semantic or self.module.semantic).config.stride
        side = (max(1, int(h * scale) // stride), max(1, int(w * scale) // stride))
        x0 = self.frozen.vqgan.encode_latents(images).float()
        t = sample_t(n, generator)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        inputs = dict(x0=x0, noise=noise, t=t, text=self.encode_text(batch["caption"], drop), keep=keep)
        if self.frozen_semantic is not None:
            inputs["effnet"] = self.frozen_semantic.encode(images, size=side).float()
        else:
            inputs.update(effnet_images=images, effnet_side=side)
        return inputs

    def live_models(self, module: nn.Module) -> dict[str, nn.Module]:
        models = super().live_models(module)
        return models | ({"semantic": module.semantic} if module.semantic is not None else {})

    def components(self, state: dict[str, Tensor]) -> dict[str, nn.Module]:
        comps = super().components(state)
        if self.cfg.train_semantic:
            sem = _strip(state, "semantic.")
            comps["semantic"] = build_from_state(SemanticCompressor, self.module.semantic.config, sem, "run")
        return comps

    def assemble(self, models: dict[str, nn.Module]) -> WuerstchenPipeline | None:
        f = self.frozen
        semantic = models.get("semantic") or (self.frozen_semantic if f.semantic_shipped else None)
        return self.pipeline(
            decoder=models["decoder"], text_encoder=f.text_encoder, tokenizer=f.tokenizer, semantic=semantic
        )

    @torch.no_grad()
    def sample(self, models: dict[str, nn.Module], path: Path) -> dict[str, float]:
        """Decode evaluation images from their semantic latents (at Stage C's side): originals on top."""
        items = [item for item in self.eval_items[:4] if "image" in item]
        semantic = models.get("semantic") or self.frozen_semantic
        f = self.frozen
        pipe = WuerstchenPipeline(None, None, None, models["decoder"], f.text_encoder, f.tokenizer, f.vqgan, f.settings)
        if not items or not _step_ok(self, pipe):
            return {}
        images = _images(items, self.device)
        effnet = semantic.encode(images, size=f.settings.prior_side(images.shape[-2:]))
        pipe.to(self.device)
        out = pipe.decode(
            effnet, prompt=[item["caption"] for item in items], num_inference_steps=self.cfg.sample_steps,
            seed=self.cfg.seed, prompt_weighting=False,
        ).images  # fmt: skip
        save_grid([to_output(images, "pil"), out], path)
        return {}


# ----------------------------------------------------------------------------- Stage A


class StageATask(Task):
    component, model_class = "vqgan", StageA

    def __init__(self, cfg: StageATrainConfig, device: torch.device, allow_pipe_urls: bool = False) -> None:
        super().__init__(cfg, device, allow_pipe_urls)
        self.frozen = load_frozen_parts(cfg, device, self.component)
        vqgan = self.build_model()
        disc = PatchDiscriminator() if cfg.adversarial else None
        self.module = VQGANLoss(vqgan, disc, cfg.recon_loss, cfg.vq_weight, cfg.adv_weight).to(device)

    def prepare(self, batch: Batch, generator: torch.Generator, step: int) -> dict[str, Any]:
        cfg: StageATrainConfig = self.cfg  # type: ignore[assignment]
        return dict(images=batch["image"].to(self.device), adversarial=cfg.adversarial and step >= cfg.adv_start)

    def enable_gradient_checkpointing(self) -> None:
        self.note("Stage A has no gradient checkpointing (it is small); training without it")

    def assemble(self, models: dict[str, nn.Module]) -> WuerstchenPipeline | None:
        if self.frozen.others.get("decoder") is None and self.frozen.others.get("prior") is None:
            return None
        return self.pipeline(vqgan=models["vqgan"])

    @torch.no_grad()
    def sample(self, models: dict[str, nn.Module], path: Path) -> dict[str, float]:
        """Reconstruct the evaluation images (quantised, as trained); PSNR over all of them."""
        items = [item for item in self.eval_items if "image" in item]
        if not items:
            return {}
        vqgan = models["vqgan"]
        psnrs, shown = [], []
        for i in range(0, len(items), self.cfg.batch_size):
            images = _images(items[i : i + self.cfg.batch_size], self.device)
            out = vqgan(images)[0].float().clamp(0, 1)
            mse = (out - images).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
            psnrs += (10 * torch.log10(1 / mse)).tolist()
            if i == 0:
                shown = [to_output(images[:4], "pil"), to_output(out[:4], "pil")]
        save_grid(shown, path)
        return {"psnr": sum(psnrs) / len(psnrs)}


TASKS: dict[str, type[Task]] = {"a": StageATask, "b": StageBTask, "c": StageCTask}
