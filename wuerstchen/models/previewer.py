"""Stable Cascade's previewer: a small conv net that turns a Stage C latent into a rough RGB image at
8× its side (16 × 24 × 24 → 3 × 192 × 192), fast enough to show the prior's progress.

Layout (Stability-AI/StableCascade, `modules/previewer.py`): one `nn.Sequential` named `blocks` of
conv → GELU → BatchNorm2d triples: a 1×1 conv to `c_hidden` and a 3×3 conv, then three 2× upsampling
steps (a 2×2 stride-2 transposed conv and a 3×3 conv each) to `c_hidden // 2`, `// 4`, `// 4`
channels, then a 1×1 conv to RGB. Parameter names are those indices (`blocks.0.weight` …
`blocks.24.bias`), so the official `previewer.safetensors` loads with `strict=True` as it is.

The output is an image roughly in [0, 1] (ComfyUI maps it to its [-1, 1] by `(x - 0.5) * 2`);
`preview` clamps it there. The input is the raw Stage C latent, as the prior samples it.

Example:
    from wuerstchen.io.cascade_files import load_previewer
    previewer = load_previewer("previewer.safetensors")
    image = previewer.preview(latents)  # (B, 16, 24, 24) → (B, 3, 192, 192) in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class PreviewerConfig:
    """Defaults are the official previewer's (3,979,651 parameters)."""

    c_in: int = 16
    c_hidden: int = 512
    c_out: int = 3

    @property
    def upscale(self) -> int:
        return 8  # three stride-2 transposed convs


PREVIEWER_PRESETS: dict[str, PreviewerConfig] = {
    "official": PreviewerConfig(),
    "tiny": PreviewerConfig(c_hidden=32),
}


class Previewer(nn.Module):
    diffusers_class = "Previewer"  # not a diffusers model; the name its config.json carries
    config_class = PreviewerConfig

    def __init__(self, config: PreviewerConfig = PreviewerConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []

        def add(conv: nn.Conv2d | nn.ConvTranspose2d) -> None:
            layers.extend((conv, nn.GELU(), nn.BatchNorm2d(conv.out_channels)))

        width = config.c_hidden
        add(nn.Conv2d(config.c_in, width, kernel_size=1))
        add(nn.Conv2d(width, width, kernel_size=3, padding=1))
        for out in (config.c_hidden // 2, config.c_hidden // 4, config.c_hidden // 4):
            add(nn.ConvTranspose2d(width, out, kernel_size=2, stride=2))
            add(nn.Conv2d(out, out, kernel_size=3, padding=1))
            width = out
        layers.append(nn.Conv2d(width, config.c_out, kernel_size=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        return self.blocks(latents)

    def preview(self, latents: Tensor) -> Tensor:
        """The image in [0, 1], in float32 whatever the weights' dtype."""
        return self(latents.to(self.blocks[0].weight.dtype)).float().clamp(0, 1)
