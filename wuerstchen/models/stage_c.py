"""Stage C, the text-conditional prior: noise estimate of a 16-channel semantic latent.

Shapes: x (B, c_in, h, w) with h = ceil(H / 42.67) for an H-px image; r (B,) in [0, 1];
clip (B, L, c_cond) text states. Output: the noise estimate, shape of x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .blocks import AttnBlock, ChannelNorm, ResBlock, TimestepBlock, r_embedding, to_channels_last
from .onednn import Linear


@dataclass(frozen=True)
class StageCConfig:
    """Field names and defaults are those of diffusers' `WuerstchenPrior`."""

    c_in: int = 16
    c: int = 1280
    c_cond: int = 1024
    c_r: int = 64
    depth: int = 16
    nhead: int = 16
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.nhead < 1 or self.c % self.nhead:
            raise UserError(f"StageCConfig: nhead={self.nhead} must be ≥ 1 and divide c={self.c}")


STAGE_C_PRESETS: dict[str, StageCConfig] = {
    # The released v2 prior (CLIP ViT-bigG/14 text states, 1280 wide): ~994M parameters.
    "official-v2": StageCConfig(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1),
    # A third of the official width, for benchmarks.
    "medium": StageCConfig(c_in=16, c=512, c_cond=1280, c_r=64, depth=8, nhead=8, dropout=0.1),
    "tiny": StageCConfig(c_in=16, c=32, c_cond=32, c_r=16, depth=2, nhead=2, dropout=0.0),
}


class StageC(nn.Module):
    diffusers_class = "WuerstchenPrior"
    config_class = StageCConfig

    def __init__(self, config: StageCConfig) -> None:
        super().__init__()
        self.config = config
        c = config.c
        self.projection = nn.Conv2d(config.c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(Linear(config.c_cond, c), nn.LeakyReLU(0.2), Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(config.depth):
            self.blocks.append(ResBlock(c, dropout=config.dropout))
            self.blocks.append(TimestepBlock(c, config.c_r))
            self.blocks.append(AttnBlock(c, c, config.nhead, self_attn=True, dropout=config.dropout))
        self.out = nn.Sequential(ChannelNorm(), nn.Conv2d(c, config.c_in * 2, kernel_size=1))
        self.gradient_checkpointing = False

    def condition(self, clip: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Text states → the text K/V of every attention block; constant over the sampling steps."""
        cond = self.cond_mapper(clip)
        return [block.text_kv(cond) for block in self.blocks if isinstance(block, AttnBlock)]

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        clip: Tensor | None = None,
        *,
        kv: list[tuple[Tensor, Tensor]] | None = None,
        copies: int = 1,
    ) -> Tensor:
        """Noise estimate for x (B, c_in, h, w) at times r (B,).

        `copies` > 1: x and r hold each row once for `copies` rows of the batch the text K/V are for
        (classifier-free guidance: the conditioned and unconditioned rows share x and r). Up to the
        first attention block nothing sees the text, so those blocks run once per row; the output
        has `copies`·B rows, copy-major like `torch.cat([x] * copies)`.
        """
        if kv is None:
            if clip is None:
                raise UserError("StageC.forward needs the text states `clip` or their precomputed `kv`")
            kv = self.condition(clip)
        r_emb = r_embedding(r, self.config.c_r).to(x.dtype)
        h = to_channels_last(self.projection(to_channels_last(x)))
        kv_iter = iter(kv)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if isinstance(block, AttnBlock):
                if copies > 1:  # from here on the rows differ
                    h = to_channels_last(torch.cat([h] * copies))
                    x, r_emb, copies = torch.cat([x] * copies), torch.cat([r_emb] * copies), 1
                args = (h, next(kv_iter))
            elif isinstance(block, TimestepBlock):
                args = (h, r_emb)
            else:
                args = (h,)
            h = checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)
        a, b = self.out(h).chunk(2, dim=1)
        # The head predicts x = a + |1 − b|·ε; solve for ε (official Prior).
        return (x - a) / ((1 - b).abs() + 1e-5)
