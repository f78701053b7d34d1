"""A cheap Stage C preview: what the prior's latent looks like while it samples.

This is a *fit*, not a decode. Decoding a semantic latent costs a whole Stage B run; instead a 16→3
affine map (16×3 matrix + bias) takes each latent pixel to the mean colour of the image patch it
covers. The map is fitted once per pipeline by least squares: decode a few random semantic latents
through Stage B and Stage A at a small size, average-pool the images to the latent grid and solve
`lstsq([z, 1], rgb)`. The result shows the layout and colours the prior is settling on, blurred
and approximate; early steps are mostly noise.

    from wuerstchen.server.preview import render_preview
    png = render_preview(pipe, latents)   # latents: Stage C samples (n, 16, h, w), prior space
"""

from __future__ import annotations

import io
import threading
import weakref

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..pipeline import WuerstchenPipeline

_maps: weakref.WeakKeyDictionary[WuerstchenPipeline, Tensor] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@torch.no_grad()
def fit_preview_map(
    pipe: WuerstchenPipeline, samples: int = 2, side: int | None = None, decoder_steps: int = 4, seed: int = 0
) -> Tensor:
    """Fit the (17, 3) map from semantic latents (what Stage B reads: x·42 − 1, plus a 1 for the
    bias) to RGB in [0, 1]. Random N(0, 1) latents stand in for the semantic compressor's
    BatchNorm-ed features. Two 256 px decodes (official weights) give 72 latent pixels for 17
    unknowns; the cost is about that of one small image, paid once."""
    side = side or 2 * pipe.size_step
    h, w = pipe.prior_latent_size(side, side)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, pipe.prior.config.c_in, h, w, generator=g)
    images = pipe.decode(z, prompt="", num_inference_steps=decoder_steps, seed=seed, output_type="pt").images
    rgb = F.adaptive_avg_pool2d(images.float().cpu(), (h, w))  # (B, 3, h, w): the patch under each latent pixel
    x = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), torch.ones(z.numel() // z.shape[1], 1)], dim=1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x, y).solution  # (17, 3)


def preview_map(pipe: WuerstchenPipeline) -> Tensor:
    """The fitted map of this pipeline, fitted on first use and kept while the pipeline lives."""
    with _lock:
        m = _maps.get(pipe)
        if m is None:
            m = _maps[pipe] = fit_preview_map(pipe)
        return m


def latents_to_rgb(pipe: WuerstchenPipeline, latents: Tensor) -> Tensor:
    """Stage C samples in prior space (n, 16, h, w) → approximate colours (n, 3, h, w) in [0, 1]."""
    st = pipe.settings
    z = latents.detach().float().cpu() * st.latent_mean - st.latent_std  # the map the pipeline applies for Stage B
    m = preview_map(pipe)
    rgb = torch.einsum("nchw,cr->nrhw", z, m[:-1]) + m[-1].view(1, 3, 1, 1)
    return rgb.clamp(0, 1)


def render_preview(pipe: WuerstchenPipeline, latents: Tensor, tile: int = 192, max_images: int = 4) -> bytes:
    """A PNG strip of the first `max_images` previews, each upscaled (nearest) to about `tile` px,
    on a transparent background with a gap between them."""
    rgb = latents_to_rgb(pipe, latents[:max_images])
    h, w = rgb.shape[-2:]
    k, gap = max(1, tile // max(h, w)), 6
    size = (w * k, h * k)
    strip = Image.new("RGBA", (len(rgb) * (size[0] + gap) - gap, size[1]), (0, 0, 0, 0))
    for i, x in enumerate(rgb):
        array = (x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        strip.paste(Image.fromarray(array).resize(size, Image.Resampling.NEAREST), (i * (size[0] + gap), 0))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return buf.getvalue()
