"""Stage A, the VQGAN (Paella's f4 VQ-VAE): images in [0, 1] ↔ 4-channel latents at 1/4 side.

`encode`/`decode` are the raw network (diffusers' `PaellaVQModel` semantics); `encode_latents` and
`decode_latents` apply the latent scale factor (encode divides, decode multiplies), which is the
space Stage B works in. v2 decodes without quantising.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .blocks import MLP
from .onednn import Linear


@dataclass(frozen=True)
class StageAConfig:
    """Field names and defaults are those of diffusers' `PaellaVQModel` (= the official f4 VQGAN)."""

    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764

    @property
    def downscale(self) -> int:
        return self.up_down_scale_factor * 2 ** (self.levels - 1)


STAGE_A_PRESETS: dict[str, StageAConfig] = {
    "official-v2": StageAConfig(),  # ~18.4M parameters
    "medium": StageAConfig(embed_dim=192, bottleneck_blocks=6),
    "tiny": StageAConfig(embed_dim=16, bottleneck_blocks=1, num_vq_embeddings=64),
}


class MixingResidualBlock(nn.Module):
    """Depthwise-conv and MLP residuals, each with a learnt pre-norm scale/shift and output gain
    (6 gammas, zero at init so the block starts as identity)."""

    band_elements = 1 << 20  # at inference, the MLP's hidden activation is at most this large (4 MB in fp32)

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.channelwise = MLP(Linear(c, c_hidden), nn.GELU(), Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: Tensor) -> Tensor:
        if kernels.active():
            return self._forward_lean(x)
        g = self.gammas
        c = x.shape[1]
        h = F.layer_norm(x.permute(0, 2, 3, 1), (c,), eps=1e-6) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h.permute(0, 3, 1, 2)) * g[2]
        h = F.layer_norm(x.permute(0, 2, 3, 1), (c,), eps=1e-6) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]

    def _forward_lean(self, x: Tensor) -> Tensor:
        """`forward` inside `kernels.inference_kernels()`: the same arithmetic with fewer full-size
        tensors alive. The decoder's last blocks run at full resolution and set the pipeline's peak
        memory. Everything runs on bands of rows, into one new output tensor: the first pre-norm of a band and its
        halo rows is written, scaled and shifted, into a replicate-padded band the depthwise conv
        reads, whose result plus `x` fills the band of the output; then the second pre-norm and the
        MLP, whose 4×-wide hidden activation (and its GELU: 2 × 805 MB for a 1024² image with the
        official VQGAN) exists one band at a time, add into it. Besides `x` and the output, only
        band-sized tensors are alive (`forward` holds five full-size ones)."""
        g = self.gammas
        b, c, height, width = x.shape
        rows = max(1, self.band_elements // (b * width * self.channelwise[0].out_features))
        bands = [(top, min(top + rows, height)) for top in range(0, height, rows)]
        x_nhwc = x.permute(0, 2, 3, 1)
        out = x.new_empty((b, height, width, c))  # NHWC storage, returned as a channels-last NCHW view
        for top, stop in bands:
            lo, hi = max(top - 1, 0), min(stop + 1, height)
            h = F.layer_norm(x_nhwc[:, lo:hi], (c,), eps=1e-6).mul_(1 + g[0]).add_(g[1])
            halo = torch.arange(top - 1, stop + 1, device=x.device).clamp_(0, height - 1) - lo  # edges replicated
            padded = x.new_empty((b, stop - top + 2, width + 2, c))
            padded[:, :, 1:-1] = h[:, halo]
            padded[:, :, 0] = padded[:, :, 1]  # and the edge columns
            padded[:, :, -1] = padded[:, :, -2]
            d = self.depthwise[1](padded.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            out[:, top:stop] = d.mul_(g[2]).add_(x_nhwc[:, top:stop])
        del h, padded, d
        for top, stop in bands:
            band = out[:, top:stop]
            h = F.layer_norm(band, (c,), eps=1e-6).mul_(1 + g[3]).add_(g[4])
            band.add_(self.channelwise(h).mul_(g[5]))
        return out.permute(0, 3, 1, 2)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with a straight-through gradient; `embedding` is the codebook."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_codes, dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, C, H, W) → (quantised z, codebook + commitment loss, indices (B, H, W))."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = self.embedding.weight.detach()
        # Nearest code by ‖z − e‖² = ‖z‖² − 2z·e + ‖e‖² (‖z‖² is the same for every code); the search is
        # not differentiable, so it runs without autograd and in chunks to bound the distance matrix.
        code_norms = codes.pow(2).sum(1)
        with torch.no_grad():
            idx = torch.cat([(code_norms[None] - 2 * chunk @ codes.t()).argmin(dim=1) for chunk in flat.split(4096)])
        zq = self.embedding(idx).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        # Codebook term pulls codes to the encoder output; commitment (β) pulls the encoder to codes.
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()
        return zq, loss, idx.view(z.shape[0], z.shape[2], z.shape[3])


class StageA(nn.Module):
    diffusers_class = "PaellaVQModel"
    config_class = StageAConfig

    def __init__(self, config: StageAConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        f = cfg.up_down_scale_factor
        c_levels = [cfg.embed_dim // 2**i for i in reversed(range(cfg.levels))]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(f), nn.Conv2d(cfg.in_channels * f * f, c_levels[0], 1))
        down: list[nn.Module] = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(c_levels[i], c_levels[i] * 4))
        # The latent is batch-normalised to zero mean, unit variance.
        down.append(
            nn.Sequential(
                nn.Conv2d(c_levels[-1], cfg.latent_channels, 1, bias=False),
                nn.BatchNorm2d(cfg.latent_channels),
            )
        )
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.num_vq_embeddings, cfg.latent_channels)
        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(cfg.latent_channels, c_levels[-1], 1))]
        for i in range(cfg.levels):
            c = c_levels[cfg.levels - 1 - i]
            for _ in range(cfg.bottleneck_blocks if i == 0 else 1):
                up.append(MixingResidualBlock(c, c * 4))
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[cfg.levels - 2 - i], 4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], cfg.out_channels * f * f, 1), nn.PixelShuffle(f))

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) → unquantised latents (B, 4, H/4, W/4)."""
        return self.down_blocks(self.in_block(images))

    def decode(self, latents: Tensor, quantize: bool = False) -> Tensor:
        """Raw latents → images (not clamped)."""
        if quantize:
            latents = self.vquantizer(latents)[0]
        return self.out_block(self.up_blocks(latents))

    def encode_latents(self, images: Tensor) -> Tensor:
        """Images → the scaled latents Stage B is trained on."""
        return self.encode(images) / self.config.scale_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Stage B latents → images clamped to [0, 1]."""
        return self.decode(latents * self.config.scale_factor).clamp(0, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass: images → (reconstruction, VQ loss), quantising the latent."""
        zq, vq_loss, _ = self.vquantizer(self.encode(images))
        return self.decode(zq), vq_loss
