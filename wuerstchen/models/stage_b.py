"""Stage B, the diffusion decoder: noise estimate of a Stage A latent, conditioned on the
semantic latent ("effnet", 16 channels) and text states.

Shapes: x (B, 4, H/4, W/4) for an H×W image; r (B,); effnet (B, 16, h, w); clip (B, L, clip_embd).
A U-Net of `len(c_hidden)` levels over PixelUnshuffle(patch_size) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .blocks import AttnBlock, ChannelNorm, ResBlockStageB, TimestepBlock, r_embedding, to_channels_last
from .onednn import Linear


@dataclass(frozen=True)
class StageBConfig:
    """Field names and defaults are those of diffusers' `WuerstchenDiffNeXt` (= the official v2)."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, 10, 20, 20)
    blocks: tuple[int, ...] = (4, 4, 14, 4)
    level_config: tuple[str, ...] = ("CT", "CTA", "CTA", "CTA")
    inject_effnet: tuple[bool, ...] = (False, True, True, True)
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3
    dropout: float | tuple[float, ...] = 0.1

    def __post_init__(self) -> None:
        n = len(self.c_hidden)
        if not n or any(len(t) != n for t in (self.nhead, self.blocks, self.level_config, self.inject_effnet)):
            raise UserError(f"StageBConfig: c_hidden, nhead, blocks, level_config, inject_effnet need {n} entries each")
        for c, heads, kinds in zip(self.c_hidden, self.nhead, self.level_config, strict=True):
            if "A" in kinds and (heads < 1 or c % heads):
                raise UserError(f"StageBConfig: a level with attention needs heads ≥ 1 dividing {c}, got {heads}")

    @property
    def stride(self) -> int:
        """How much the latent side shrinks at the deepest level: sides must divide by it."""
        return self.patch_size * 2 ** (len(self.c_hidden) - 1)


STAGE_B_PRESETS: dict[str, StageBConfig] = {
    "official-v2": StageBConfig(),  # CLIP ViT-H/14 text states; ~1055M parameters
    "medium": StageBConfig(
        c_cond=384, c_hidden=(96, 192, 384, 384), nhead=(-1, 4, 8, 8), blocks=(2, 2, 6, 2), clip_embd=1024
    ),
    "tiny": StageBConfig(
        c_r=16,
        c_cond=32,
        c_hidden=(16, 32),
        nhead=(-1, 2),
        blocks=(1, 1),
        level_config=("CT", "CTA"),
        inject_effnet=(False, True),
        clip_embd=32,
        dropout=0.0,
    ),
}


@dataclass
class StageBCondition:
    """What stays the same over the sampling steps: text K/V per attention block (in module order),
    the mapped semantic latent at each level (down levels, then up levels; None where unused) and,
    unless `StageB.project_effnet` is off, each ResBlock's projection of it (`project_skip`)."""

    kv: list[tuple[Tensor, Tensor]]
    effnet: list[Tensor | None]
    projected: list[list[Tensor | None]] = field(default_factory=list)  # [level][block]


class StageB(nn.Module):
    diffusers_class = "WuerstchenDiffNeXt"
    config_class = StageBConfig

    def __init__(self, config: StageBConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        levels = len(cfg.c_hidden)
        dropout = cfg.dropout if isinstance(cfg.dropout, tuple) else (cfg.dropout,) * levels
        self.clip_mapper = Linear(cfg.clip_embd, cfg.c_cond)
        inject = list(cfg.inject_effnet) + list(reversed(cfg.inject_effnet))
        self.effnet_mappers = nn.ModuleList(
            [nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if i else None for i in inject]
        )
        p = cfg.patch_size
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(p), nn.Conv2d(cfg.c_in * p * p, cfg.c_hidden[0], kernel_size=1), ChannelNorm()
        )

        def block(kind: str, level: int, c_skip: int = 0) -> nn.Module:
            c = cfg.c_hidden[level]
            if kind == "C":
                return ResBlockStageB(c, c_skip, kernel_size=cfg.kernel_size, dropout=dropout[level])
            if kind == "A":
                return AttnBlock(c, cfg.c_cond, cfg.nhead[level], self_attn=True, dropout=dropout[level])
            if kind == "T":
                return TimestepBlock(c, cfg.c_r)
            raise UserError(f"unknown block type {kind!r} in level_config (use C, T, A)")

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(ChannelNorm(), nn.Conv2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], 2, stride=2)))
            effnet_skip = cfg.c_cond if cfg.inject_effnet[i] else 0
            for _ in range(cfg.blocks[i]):
                for kind in cfg.level_config[i]:
                    level.append(block(kind, i, effnet_skip))
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(cfg.blocks[i]):
                for k, kind in enumerate(cfg.level_config[i]):
                    # The first block of a level below the deepest also takes the U-Net skip.
                    c_skip = cfg.c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    c_skip += cfg.c_cond if cfg.inject_effnet[i] else 0
                    level.append(block(kind, i, c_skip))
            if i > 0:
                level.append(
                    nn.Sequential(ChannelNorm(), nn.ConvTranspose2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], 2, stride=2))
                )
            self.up_blocks.append(level)
        self.clf = nn.Sequential(
            ChannelNorm(),
            nn.Conv2d(cfg.c_hidden[0], 2 * cfg.c_out * p * p, kernel_size=1),
            nn.PixelShuffle(p),
        )
        self.gradient_checkpointing = False
        # Project the semantic condition once per generation (StageBCondition). Its memory: 4 · c
        # values per token of every ResBlock at an injected level (fp32, 1024² official: ~0.9 GiB).
        self.project_effnet = True

    def level_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        h, w = height // self.config.patch_size, width // self.config.patch_size
        sizes = []
        for _ in self.config.c_hidden:
            sizes.append((h, w))
            h, w = h // 2, w // 2
        return sizes

    def condition(self, effnet: Tensor, clip: Tensor | None, size: tuple[int, int]) -> StageBCondition:
        """Precompute the step-invariant conditioning for latents of spatial `size`."""
        kv = []
        if clip is not None:
            clip = F.layer_norm(self.clip_mapper(clip), (self.config.c_cond,), eps=1e-6)
            kv = [m.text_kv(clip) for m in self.modules() if isinstance(m, AttnBlock)]
        sizes = self.level_sizes(*size)
        sizes = sizes + sizes[::-1]
        mapped: list[Tensor | None] = []
        for mapper, level_size in zip(self.effnet_mappers, sizes, strict=True):
            if mapper is None:
                mapped.append(None)
                continue
            # Bicubic with antialias, in float32 (the official decoder does it so).
            e = F.interpolate(effnet.float(), size=level_size, mode="bicubic", antialias=True, align_corners=True)
            mapped.append(to_channels_last(mapper(e.to(effnet.dtype))))
        projected = []
        if self.project_effnet and not torch.is_grad_enabled():  # training: no gain, more memory
            levels = list(self.down_blocks) + list(self.up_blocks)
            projected = [
                [b.project_skip(e) if e is not None and isinstance(b, ResBlockStageB) else None for b in level]
                for level, e in zip(levels, mapped, strict=True)
            ]
        return StageBCondition(kv=kv, effnet=mapped, projected=projected)

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        effnet: Tensor | None = None,
        clip: Tensor | None = None,
        *,
        cond: StageBCondition | None = None,
        eps: float = 1e-3,
    ) -> Tensor:
        if cond is None:
            if effnet is None:
                raise UserError("StageB.forward needs the semantic latent `effnet` or a precomputed `cond`")
            cond = self.condition(effnet, clip, x.shape[-2:])
        r_emb = r_embedding(r, self.config.c_r).to(x.dtype)
        kv_iter = iter(cond.kv)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()

        def run(block: nn.Module, h: Tensor, skip: Tensor | None, level: int, j: int) -> Tensor:
            if isinstance(block, ResBlockStageB):
                effnet_c = cond.effnet[level]
                projected = cond.projected[level][j] if cond.projected else None
                if projected is not None:
                    args = (h, skip, projected)
                elif effnet_c is not None:
                    args = (h, effnet_c if skip is None else torch.cat([skip, effnet_c], dim=1))
                else:
                    args = (h, skip)
            elif isinstance(block, AttnBlock):
                args = (h, next(kv_iter))
            elif isinstance(block, TimestepBlock):
                args = (h, r_emb)
            else:
                return to_channels_last(block(h))
            return checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)

        h = to_channels_last(self.embedding(to_channels_last(x)))
        skips = []
        for i, level in enumerate(self.down_blocks):
            for j, block in enumerate(level):
                h = run(block, h, None, i, j)
            skips.insert(0, h)
        h = skips[0]
        n = len(self.down_blocks)
        for i, level in enumerate(self.up_blocks):
            for j, block in enumerate(level):
                h = run(block, h, skips[i] if j == 0 and i > 0 else None, n + i, j)
        a, b = self.clf(h).chunk(2, dim=1)
        # x = a + b·ε with b kept in [eps, 1 − eps] (official DiffNeXt head).
        b = b.sigmoid() * (1 - 2 * eps) + eps
        return (x - a) / b
