"""Stable Cascade's (Würstchen v3) U-Net: Stage C and Stage B of v3 are this one network, configured
apart (as diffusers' `StableCascadeUNet`, whose parameter names and config fields these are).

Stage C: x (B, 16, h, w), h = ⌈H / 42.67⌉ for an H-px image; conditions: CLIP-G token states
(B, 77, 1280), the pooled text embedding (B, 1, 1280) and CLIP image embeddings (B, k, 768), each
pooled/image row mapped to `clip_seq` tokens, all layer-normed; two levels at one resolution.
Stage B: x (B, 4, H/4, W/4) (the VQGAN latent); conditions: the pooled text embedding and the
Stage C latent ("effnet", 16 channels) resized to the first level and added there, with a pixel
mapper (zeros at inference). Both: r (B,) in [0, 1] plus time-like conditions (`sca`, `crp`,
zero unless given), sinusoidally embedded; the output is the noise estimate ε, shape of x.

Levels repeat their blocks `repeat_mappers` times with a 1×1 conv between the passes (the same
weights each pass). The step-invariant conditioning (the text K/V of every attention block, Stage
B's mapped semantic latent) is computed once per generation by `condition`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .blocks import AttnBlock, ChannelNorm, ResBlockStageB, TimestepBlock, r_embedding, to_channels_last
from .onednn import Linear

RES, TIME, ATTN = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"


@dataclass(frozen=True)
class CascadeUNetConfig:
    """Field names and defaults are those of diffusers' `StableCascadeUNet` (its defaults: Stage C full)."""

    in_channels: int = 16
    out_channels: int = 16
    timestep_ratio_embedding_dim: int = 64
    patch_size: int = 1
    conditioning_dim: int = 2048
    block_out_channels: tuple[int, ...] = (2048, 2048)
    num_attention_heads: tuple[int, ...] = (32, 32)
    down_num_layers_per_block: tuple[int, ...] = (8, 24)
    up_num_layers_per_block: tuple[int, ...] = (24, 8)
    down_blocks_repeat_mappers: tuple[int, ...] | None = (1, 1)
    up_blocks_repeat_mappers: tuple[int, ...] | None = (1, 1)
    block_types_per_layer: tuple[tuple[str, ...], ...] = ((RES, TIME, ATTN), (RES, TIME, ATTN))
    clip_text_in_channels: int | None = None
    clip_text_pooled_in_channels: int = 1280
    clip_image_in_channels: int | None = None
    clip_seq: int = 4
    effnet_in_channels: int | None = None
    pixel_mapper_in_channels: int | None = None
    kernel_size: int = 3
    dropout: float | tuple[float, ...] = (0.1, 0.1)
    self_attn: bool | tuple[bool, ...] = True
    timestep_conditioning_type: tuple[str, ...] = ("sca", "crp")
    switch_level: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        lists = (self.num_attention_heads, self.down_num_layers_per_block, self.up_num_layers_per_block,
                 self.block_types_per_layer)  # fmt: skip
        if not n or any(len(t) != n for t in lists):
            raise UserError(f"CascadeUNetConfig: the per-level lists need {n} entries each (block_out_channels)")
        for c, heads, kinds in zip(self.block_out_channels, self.num_attention_heads, self.block_types_per_layer,
                                   strict=True):  # fmt: skip
            if any("Attn" in k for k in kinds) and (heads < 1 or c % heads):
                raise UserError(f"CascadeUNetConfig: a level with attention needs heads ≥ 1 dividing {c}, got {heads}")

    def per_level(self, value: float | bool | tuple) -> tuple:
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def stride(self) -> int:
        """How much the latent side shrinks at the deepest level: sides must divide by it (Stage C's
        levels keep the resolution: `switch_level` False)."""
        levels = len(self.block_out_channels) - 1
        down = levels if self.switch_level is None else sum(bool(on) for on in self.switch_level)
        return self.patch_size * 2**down


_C_BLOCKS = ((RES, TIME, ATTN), (RES, TIME, ATTN))
_B_BLOCKS = ((RES, TIME), (RES, TIME), (RES, TIME, ATTN), (RES, TIME, ATTN))
# Stage C: CLIP-G text (1280), ViT-L image embeddings (768). Stage B: pooled CLIP-G, effnet 16 ch.
_C = dict(clip_text_in_channels=1280, clip_text_pooled_in_channels=1280, clip_image_in_channels=768,
          dropout=(0.1, 0.1), timestep_conditioning_type=("sca", "crp"), switch_level=(False,))  # fmt: skip
_B = dict(in_channels=4, out_channels=4, patch_size=2, conditioning_dim=1280, block_types_per_layer=_B_BLOCKS,
          clip_text_pooled_in_channels=1280, effnet_in_channels=16, pixel_mapper_in_channels=3,
          dropout=(0.0, 0.0, 0.1, 0.1), timestep_conditioning_type=("sca",))  # fmt: skip

CASCADE_PRESETS: dict[str, CascadeUNetConfig] = {
    # The released models (diffusers' scripts/convert_stable_cascade.py and _lite.py, the hub's
    # prior/, prior_lite/, decoder/, decoder_lite/ configs).
    "stage-c": CascadeUNetConfig(**_C),  # ~3.6B parameters
    "stage-c-lite": CascadeUNetConfig(
        **_C,
        conditioning_dim=1536,
        block_out_channels=(1536, 1536),
        num_attention_heads=(24, 24),
        down_num_layers_per_block=(4, 12),
        up_num_layers_per_block=(12, 4),
    ),  # fmt: skip  ~1.0B
    "stage-b": CascadeUNetConfig(
        **_B,
        block_out_channels=(320, 640, 1280, 1280),
        num_attention_heads=(0, 0, 20, 20),
        down_num_layers_per_block=(2, 6, 28, 6),
        up_num_layers_per_block=(6, 28, 6, 2),
        down_blocks_repeat_mappers=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(3, 3, 2, 2),
    ),  # fmt: skip  ~1.5B
    "stage-b-lite": CascadeUNetConfig(
        **_B,
        block_out_channels=(320, 576, 1152, 1152),
        num_attention_heads=(0, 9, 18, 18),
        down_num_layers_per_block=(2, 4, 14, 4),
        up_num_layers_per_block=(4, 14, 4, 2),
        down_blocks_repeat_mappers=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(2, 2, 2, 2),
    ),  # fmt: skip  ~0.7B
    # About a quarter of the lite widths, for CPU benchmarks.
    "medium-c": CascadeUNetConfig(
        **{**_C, "clip_image_in_channels": 768},
        conditioning_dim=384,
        block_out_channels=(384, 384),
        num_attention_heads=(6, 6),
        down_num_layers_per_block=(2, 4),
        up_num_layers_per_block=(4, 2),
    ),  # fmt: skip
    "medium-b": CascadeUNetConfig(
        **{**_B, "conditioning_dim": 320},
        block_out_channels=(96, 160, 320, 320),
        num_attention_heads=(0, 0, 5, 5),
        down_num_layers_per_block=(1, 2, 4, 2),
        up_num_layers_per_block=(2, 4, 2, 1),
        down_blocks_repeat_mappers=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(2, 2, 1, 1),
    ),  # fmt: skip
    # Test sizes: repeat mappers, both kinds of down-scaler and every conditioning kept.
    "tiny-c": CascadeUNetConfig(
        in_channels=16,
        out_channels=16,
        timestep_ratio_embedding_dim=16,
        conditioning_dim=32,
        block_out_channels=(32, 32),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 2),
        up_blocks_repeat_mappers=(2, 1),
        block_types_per_layer=_C_BLOCKS,
        clip_text_in_channels=32,
        clip_text_pooled_in_channels=32,
        clip_image_in_channels=24,
        dropout=(0.0, 0.0),
        switch_level=(False,),
    ),  # fmt: skip
    "tiny-b": CascadeUNetConfig(
        in_channels=4,
        out_channels=4,
        timestep_ratio_embedding_dim=16,
        patch_size=2,
        conditioning_dim=32,
        block_out_channels=(16, 32),
        num_attention_heads=(0, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(2, 1),
        block_types_per_layer=((RES, TIME), (RES, TIME, ATTN)),
        clip_text_pooled_in_channels=32,
        effnet_in_channels=16,
        pixel_mapper_in_channels=3,
        dropout=(0.0, 0.0),
        timestep_conditioning_type=("sca",),
    ),  # fmt: skip
}


class UpDownBlock2d(nn.Module):
    """A 1×1 conv and, when `enabled`, a ×2 / ×½ bilinear resize (align_corners), conv last going up."""

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool) -> None:
        super().__init__()
        resize = nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
        resize = resize if enabled else nn.Identity()
        conv = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList([resize, conv] if mode == "up" else [conv, resize])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _mapper(c_in: int, c: int) -> nn.Sequential:
    """Stage B's effnet / pixel mappers: 1×1 conv to 4c, GELU, 1×1 conv to c, channel LayerNorm."""
    return nn.Sequential(nn.Conv2d(c_in, c * 4, 1), nn.GELU(), nn.Conv2d(c * 4, c, 1), ChannelNorm())


@dataclass
class CascadeCondition:
    """What stays the same over the sampling steps: the text K/V of every attention block (in module
    order) and, for Stage B, the semantic latent and pixels mapped and resized to the first level
    (added after the embedding), for latents of spatial `size`."""

    kv: list[tuple[Tensor, Tensor]]
    added: Tensor | None
    size: tuple[int, int] | None


class CascadeUNet(nn.Module):
    diffusers_class = "StableCascadeUNet"
    config_class = CascadeUNetConfig

    def __init__(self, config: CascadeUNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        widths, levels = cfg.block_out_channels, len(cfg.block_out_channels)
        for name in ("num_attention_heads", "down_num_layers_per_block", "up_num_layers_per_block",
                     "block_types_per_layer"):  # fmt: skip
            if len(getattr(cfg, name)) != levels:
                raise UserError(f"CascadeUNetConfig.{name} needs one entry per level ({levels})")
        dropout, self_attn = cfg.per_level(cfg.dropout), cfg.per_level(cfg.self_attn)
        c0 = widths[0]
        if cfg.effnet_in_channels is not None:
            self.effnet_mapper = _mapper(cfg.effnet_in_channels, c0)
        if cfg.pixel_mapper_in_channels is not None:
            self.pixels_mapper = _mapper(cfg.pixel_mapper_in_channels, c0)
        d = cfg.conditioning_dim
        self.clip_txt_pooled_mapper = Linear(cfg.clip_text_pooled_in_channels, d * cfg.clip_seq)
        if cfg.clip_text_in_channels is not None:
            self.clip_txt_mapper = Linear(cfg.clip_text_in_channels, d)
        if cfg.clip_image_in_channels is not None:
            self.clip_img_mapper = Linear(cfg.clip_image_in_channels, d * cfg.clip_seq)
        p = cfg.patch_size
        self.embedding = nn.Sequential(nn.PixelUnshuffle(p), nn.Conv2d(cfg.in_channels * p * p, c0, 1), ChannelNorm())

        def block(kind: str, i: int, c_skip: int = 0) -> nn.Module:
            if kind == RES:
                return ResBlockStageB(widths[i], c_skip, kernel_size=cfg.kernel_size, dropout=dropout[i])
            if kind == ATTN:
                return AttnBlock(widths[i], d, cfg.num_attention_heads[i], self_attn=self_attn[i], dropout=dropout[i])
            if kind == TIME:
                return TimestepBlock(widths[i], cfg.timestep_ratio_embedding_dim, conds=cfg.timestep_conditioning_type)
            raise UserError(f"unknown block type {kind!r} (use {RES}, {TIME}, {ATTN})")

        def repeats(counts: tuple[int, ...] | None, i: int) -> nn.ModuleList:
            n = counts[i] if counts is not None else 1
            return nn.ModuleList([nn.Conv2d(widths[i], widths[i], 1) for _ in range(n - 1)])

        self.down_blocks, self.down_downscalers, self.down_repeat_mappers = (
            nn.ModuleList(),
            nn.ModuleList(),
            nn.ModuleList(),
        )
        for i in range(levels):
            if i == 0:
                self.down_downscalers.append(nn.Identity())
            elif cfg.switch_level is not None:
                down = UpDownBlock2d(widths[i - 1], widths[i], "down", cfg.switch_level[i - 1])
                self.down_downscalers.append(nn.Sequential(ChannelNorm(), down))
            else:
                self.down_downscalers.append(nn.Sequential(ChannelNorm(), nn.Conv2d(widths[i - 1], widths[i], 2, 2)))
            kinds = cfg.block_types_per_layer[i]
            self.down_blocks.append(
                nn.ModuleList([block(kind, i) for _ in range(cfg.down_num_layers_per_block[i]) for kind in kinds])
            )
            self.down_repeat_mappers.append(repeats(cfg.down_blocks_repeat_mappers, i))

        self.up_blocks, self.up_upscalers, self.up_repeat_mappers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        up_layers = cfg.up_num_layers_per_block[::-1]  # listed deepest level first
        up_repeats = cfg.up_blocks_repeat_mappers[::-1] if cfg.up_blocks_repeat_mappers is not None else None
        for i in reversed(range(levels)):
            if i == 0:
                self.up_upscalers.append(nn.Identity())
            elif cfg.switch_level is not None:
                up = UpDownBlock2d(widths[i], widths[i - 1], "up", cfg.switch_level[i - 1])
                self.up_upscalers.append(nn.Sequential(ChannelNorm(), up))
            else:
                self.up_upscalers.append(
                    nn.Sequential(ChannelNorm(), nn.ConvTranspose2d(widths[i], widths[i - 1], 2, 2))
                )
            kinds = cfg.block_types_per_layer[i]
            level = nn.ModuleList()
            for j in range(up_layers[i]):
                for k, kind in enumerate(kinds):
                    # The first block of a level below the deepest also takes the U-Net skip.
                    level.append(block(kind, i, widths[i] if i < levels - 1 and j == k == 0 else 0))
            self.up_blocks.append(level)
            self.up_repeat_mappers.append(repeats(up_repeats, i))
        self.clf = nn.Sequential(ChannelNorm(), nn.Conv2d(c0, cfg.out_channels * p * p, 1), nn.PixelShuffle(p))
        self.gradient_checkpointing = False

    # -------------------------------------------------------------------------------- conditions
    def clip_tokens(self, clip_text_pooled: Tensor, clip_text: Tensor | None = None,
                    clip_img: Tensor | None = None) -> Tensor:  # fmt: skip
        """The conditioning tokens (B, L, conditioning_dim): Stage C's text states, pooled text and
        image embeddings (`clip_seq` tokens a row each), or the pooled text alone (Stage B; also
        Stage C when either the text or the image is missing, as diffusers does)."""
        cfg = self.config
        pooled = clip_text_pooled if clip_text_pooled.dim() == 3 else clip_text_pooled[:, None]
        b = pooled.shape[0]
        tokens = self.clip_txt_pooled_mapper(pooled).reshape(b, pooled.shape[1] * cfg.clip_seq, -1)
        if clip_text is not None and clip_img is not None:
            if not hasattr(self, "clip_txt_mapper") or not hasattr(self, "clip_img_mapper"):
                raise UserError("this model takes only the pooled text embedding (a Stage B?)")
            img = clip_img if clip_img.dim() == 3 else clip_img[:, None]
            img = self.clip_img_mapper(img).reshape(b, img.shape[1] * cfg.clip_seq, -1)
            tokens = torch.cat([self.clip_txt_mapper(clip_text), tokens, img], dim=1)
        return F.layer_norm(tokens, (cfg.conditioning_dim,), eps=1e-6)

    def condition(self, clip_text_pooled: Tensor, clip_text: Tensor | None = None, clip_img: Tensor | None = None,
                  effnet: Tensor | None = None, pixels: Tensor | None = None,
                  size: tuple[int, int] | None = None) -> CascadeCondition:  # fmt: skip
        """Precompute the step-invariant conditioning; `size` is the spatial size of the latents
        (needed for Stage B's semantic latent, which is resized to the first level)."""
        tokens = self.clip_tokens(clip_text_pooled, clip_text, clip_img)
        kv = [m.text_kv(tokens) for m in self.modules() if isinstance(m, AttnBlock)]
        added = None
        if hasattr(self, "effnet_mapper") or hasattr(self, "pixels_mapper"):
            if size is None:
                raise UserError("CascadeUNet.condition needs the latents' `size` for the semantic latent")
            added = self._added(tokens.shape[0], effnet, pixels, size, tokens.dtype, tokens.device)
        return CascadeCondition(kv=kv, added=added, size=None if size is None else tuple(size))

    def _added(self, b: int, effnet: Tensor | None, pixels: Tensor | None, size: tuple[int, int],
               dtype: torch.dtype, device: torch.device) -> Tensor | None:  # fmt: skip
        """What Stage B adds after its embedding: the mapped semantic latent and pixels, bilinearly
        resized (align_corners) to the first level; pixels default to zeros (B, 3, 8, 8) as diffusers'."""
        level = (size[0] // self.config.patch_size, size[1] // self.config.patch_size)
        added = None
        if hasattr(self, "effnet_mapper") and effnet is not None:
            e = F.interpolate(effnet, size=level, mode="bilinear", align_corners=True)
            added = self.effnet_mapper(e)
        if hasattr(self, "pixels_mapper"):
            px = pixels if pixels is not None else torch.zeros(b, 3, 8, 8, dtype=dtype, device=device)
            mapped = F.interpolate(self.pixels_mapper(px), size=level, mode="bilinear", align_corners=True)
            added = mapped if added is None else added + mapped
        return None if added is None else to_channels_last(added)

    def time_embedding(self, r: Tensor, sca: Tensor | None = None, crp: Tensor | None = None) -> Tensor:
        """r and each time-like condition (zero unless given) embedded side by side, in r's dtype."""
        given, dim = {"sca": sca, "crp": crp}, self.config.timestep_ratio_embedding_dim
        embs = [r_embedding(r, dim)]
        for name in self.config.timestep_conditioning_type:
            value = given.get(name)
            embs.append(r_embedding(torch.zeros_like(r) if value is None else value, dim))
        return torch.cat(embs, dim=1)

    # -------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        r: Tensor,
        clip_text_pooled: Tensor | None = None,
        clip_text: Tensor | None = None,
        clip_img: Tensor | None = None,
        effnet: Tensor | None = None,
        pixels: Tensor | None = None,
        sca: Tensor | None = None,
        crp: Tensor | None = None,
        *,
        cond: CascadeCondition | None = None,
    ) -> Tensor:
        """Noise estimate for x at times r (B,); the conditions as diffusers' `StableCascadeUNet`
        takes them, or precomputed (`condition`)."""
        if cond is None:
            if clip_text_pooled is None:
                raise UserError("CascadeUNet.forward needs `clip_text_pooled` (or a precomputed `cond`)")
            cond = self.condition(clip_text_pooled, clip_text, clip_img, effnet, pixels, tuple(x.shape[-2:]))
        elif cond.size is not None and cond.size != tuple(x.shape[-2:]):
            raise UserError(f"the condition was made for latents of size {cond.size}, not {tuple(x.shape[-2:])}")
        r_emb = self.time_embedding(r, sca, crp).to(x.dtype)
        h = to_channels_last(self.embedding(to_channels_last(x)))
        if cond.added is not None:
            h = h + cond.added
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()

        def run(block: nn.Module, h: Tensor, kv: Iterator, skip: Tensor | None = None) -> Tensor:
            if isinstance(block, ResBlockStageB):
                args = (h, skip)
            elif isinstance(block, AttnBlock):
                args = (h, next(kv))
            else:
                args = (h, r_emb)
            return checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)

        # Each level's text K/V (cond.kv follows module order: down levels, then up levels); a
        # level's blocks run `len(repeat_mappers) + 1` times with the same weights and K/V.
        level_kv, at = [], 0
        for level in (*self.down_blocks, *self.up_blocks):
            count = sum(isinstance(b, AttnBlock) for b in level)
            level_kv.append(cond.kv[at : at + count])
            at += count
        skips = []
        for i, (level, down, repmap) in enumerate(
            zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers, strict=True)
        ):
            h = to_channels_last(down(h))
            for rep in range(len(repmap) + 1):
                kv = iter(level_kv[i])
                for block in level:
                    h = run(block, h, kv)
                if rep < len(repmap):
                    h = to_channels_last(repmap[rep](h))
            skips.insert(0, h)
        h = skips[0]
        n_down = len(self.down_blocks)
        for i, (level, up, repmap) in enumerate(
            zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers, strict=True)
        ):
            for rep in range(len(repmap) + 1):
                kv = iter(level_kv[n_down + i])
                for k, block in enumerate(level):
                    skip = skips[i] if k == 0 and i > 0 and isinstance(block, ResBlockStageB) else None
                    if skip is not None and h.shape[-2:] != skip.shape[-2:]:  # odd sides: resize to the skip's
                        h = F.interpolate(h.float(), skip.shape[-2:], mode="bilinear", align_corners=True)
                        h = to_channels_last(h.to(skip.dtype))
                    h = run(block, h, kv, skip)
                if rep < len(repmap):
                    h = to_channels_last(repmap[rep](h))
            h = to_channels_last(up(h))
        return self.clf(h)
