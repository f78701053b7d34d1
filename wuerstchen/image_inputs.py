"""Images in: image-to-image, inpainting and variations, for both generations.

Würstchen's stages make these cheap. The semantic compressor turns any image into the latent that
Stage C generates, so image-to-image noises that latent to the time where the last `strength` of
the prior's steps begin and runs those steps from there; Stage B and A then decode it as any sampled latent. Inpainting
keeps the unmasked region of every stage's latent on the original's (noised to the step's time),
and the final pixels outside the mask are the original's. No special weights are needed.

    out = pipe("a blue circle", image=Image.open("red.png"), strength=0.6, seed=1)
    out = pipe("a yellow star", image=scene, mask_image=mask, seed=1)        # white = repaint
    out = pipe.variations(Image.open("in.png"), num_images=4, seed=1)

Sizes: without `height`/`width` the output has the image's size (snapped down to the model's size
step); with them the image is scaled to cover that size and centre-cropped ("crop and resize"). A
mask must have the image's size and goes through the same resize.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .errors import UserError
from .sampling import add_noise

# A step of a sampling loop may replace its latents: (index of the time reached, latents) → latents.
Keep = Callable[[int, Tensor], Tensor]
VARIATION_STRENGTH = 0.3  # Würstchen v2's variations: the image's latent re-noised this much in Stage C


@dataclass
class ImageSource:
    """The image inputs of one call, at the generation's size, on the CPU in float32.

    pixels: (k, 3, H, W) in [0, 1], one image for all prompts (k = 1) or one per prompt.
    mask: (k, 1, H, W) in [0, 1], 1 = repaint, or None (image-to-image / variations).
    strength: the share of Stage C's steps that run, from the image's latent noised to the time
    where they start (as diffusers' and A1111's img2img: 1 = all, from pure noise: text-to-image;
    0 = none: the image's latent as it is); decoder_strength the same for Stage B (default 1).
    """

    pixels: Tensor
    mask: Tensor | None
    strength: float
    decoder_strength: float

    def rows(self, x: Tensor, n: int) -> Tensor:
        """(k, ...) → (n, ...): each image repeated for its prompt's images, as prompts are."""
        if n % x.shape[0]:
            raise UserError(f"got {x.shape[0]} images for {n} outputs: give one image, or one per prompt")
        return x.repeat_interleave(n // x.shape[0], dim=0)

    def start(self, x0: Tensor, noise: Tensor, times: list[float],
              strength: float) -> tuple[Tensor, list[float], Keep | None]:  # fmt: skip
        """Where a stage's sampling starts from the original's latent `x0` (n rows, like `noise`):
        the latents, the times left to run, and (inpainting) the step hook that puts the known
        region back on the original's latent noised to each step's time, with the same noise."""
        mask = None if self.mask is None else _mask_at(self.rows(self.mask, x0.shape[0]), x0.shape[-2:])
        steps = len(times) - 1
        run = min(int(steps * strength + 1e-9), steps)  # the last `strength` of the steps, as diffusers
        if run == steps:
            x, left = noise, times
        elif run == 0:
            x, left = x0, []
        else:
            left = times[steps - run :]
            x = add_noise(x0, noise, torch.full((x0.shape[0],), left[0]))
        if mask is None or len(left) < 2:
            return x, left, None

        mask = mask.to(x0.device)  # once, not at every step

        def keep(i: int, x: Tensor) -> Tensor:
            t = left[i + 1]
            known = x0 if t <= 0 else add_noise(x0, noise, torch.full((x0.shape[0],), t))
            return torch.lerp(known.to(x.dtype), x, mask.to(x.dtype))

        return x, left, keep

    def composite(self, images: Tensor) -> Tensor:
        """The final pixels: the generated ones inside the mask, the original's outside (exactly)."""
        if self.mask is None:
            return images
        n = images.shape[0]
        mask = self.rows(self.mask, n).to(images.device)
        return torch.lerp(self.rows(self.pixels, n).to(images.device), images, mask)


def check_strength(value: float | None, name: str, default: float) -> float:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise UserError(f"`{name}` must be a number in [0, 1] (1 = ignore the image, 0 = keep it), got {value!r}", name)
    return float(value)


def prepare(
    pipe: Any, image: Any, mask_image: Any, strength: float | None, decoder_strength: float | None,
    height: int | None, width: int | None,
) -> tuple[ImageSource | None, int | None, int | None]:  # fmt: skip
    """Check and resize the call's image inputs; returns the source and the generation's size."""
    if image is None:
        if mask_image is not None or strength is not None or decoder_strength is not None:
            raise UserError("`mask_image`, `strength` and `decoder_strength` need an `image` to start from", "image")
        return None, height, width
    images = list(image) if isinstance(image, list | tuple) else [image]
    if not images:
        raise UserError("`image` is an empty list: give at least one image", "image")
    sizes = {_size_of(im, "image") for im in images}
    if len(sizes) > 1:
        raise UserError(f"the images have different sizes {sorted(sizes)}: give images of one size", "image")
    (size,) = sizes
    height, width = pipe.check_size(height or size[0], width or size[1])
    pixels = torch.cat([_pixels(im, (height, width)) for im in images])
    mask = None
    if mask_image is not None:
        masks = list(mask_image) if isinstance(mask_image, list | tuple) else [mask_image]
        if len(masks) not in (1, len(images)):
            message = f"got {len(masks)} masks for {len(images)} images: give one, or one per image"
            raise UserError(message, "mask_image")
        for m in masks:
            if (got := _size_of(m, "mask_image")) != size:
                raise UserError(f"the mask is {got[1]}×{got[0]} px but the image is {size[1]}×{size[0]}: "
                                "give a mask of the image's size (white = repaint)", "mask_image")  # fmt: skip
        mask = torch.cat([_mask_pixels(m, (height, width)) for m in masks])
        mask = mask.expand(pixels.shape[0], -1, -1, -1).contiguous() if mask.shape[0] == 1 else mask
    default = 1.0 if mask is not None else 0.6
    source = ImageSource(pixels, mask, check_strength(strength, "strength", default),
                         check_strength(decoder_strength, "decoder_strength", 1.0))  # fmt: skip
    return source, height, width


def semantic_latents(pipe: Any, source: ImageSource, shape: tuple[int, ...]) -> Tensor:
    """The images' Stage C latents (n, 16, h, w) in the prior's space: the compressor at the
    latent size Stage C uses, mapped as training maps it."""
    if pipe.semantic is None:
        raise UserError(
            "this model has no semantic compressor (a semantic/ folder): image-to-image and inpainting need one; "
            "for Stable Cascade convert with `wuerstchen convert --cascade ... --effnet effnet_encoder.safetensors`"
        )
    with pipe._placed("semantic") as encoder:
        dtype = next(encoder.parameters()).dtype
        z = encoder.encode(source.pixels.to(pipe.device, dtype), size=tuple(shape[2:])).float()
    return source.rows(pipe.prior_part.from_decoder(z, pipe.settings), shape[0])


def vqgan_latents(pipe: Any, source: ImageSource, shape: tuple[int, ...]) -> Tensor:
    """The images' Stage B latents (n, 4, H/4, W/4), as Stage B is trained on them."""
    with pipe._placed("vqgan") as vqgan:
        dtype = next(vqgan.parameters()).dtype
        z = vqgan.encode_latents(source.pixels.to(pipe.device, dtype)).float()
    if tuple(z.shape[1:]) != tuple(shape[1:]):
        raise UserError(f"the image's Stage A latent {tuple(z.shape[1:])} does not fit Stage B's {tuple(shape[1:])}")
    return source.rows(z, shape[0])


def _size_of(image: Any, name: str) -> tuple[int, int]:
    """(height, width) of a PIL image, an (H, W[, C]) array or a ([B,] C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return image.shape[0], image.shape[1]
    if isinstance(image, Tensor) and image.dim() in (2, 3, 4):
        return tuple(image.shape[-2:])
    raise UserError(f"`{name}` must be a PIL image, a numpy array (H, W, 3) or a tensor (3, H, W), "
                    f"got {type(image).__name__}", name)  # fmt: skip


def _to_tensor(image: Any, name: str, channels: int) -> Tensor:
    """Any accepted input → float32 (1, channels, h, w) in [0, 1], at its own size."""
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        a = image.astype(np.float32) / 255.0 if np.issubdtype(image.dtype, np.integer) else image.astype(np.float32)
        x = torch.from_numpy(a)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    else:
        x = image.detach().float().cpu()
        x = x[None] if x.dim() == 2 else x[0] if x.dim() == 4 else x
    if x.shape[0] != channels:
        want = "RGB (3 channels)" if channels == 3 else "one channel (L: white = repaint)"
        raise UserError(f"`{name}` has {x.shape[0]} channels: give {want}", name)
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise UserError(f"`{name}` has values outside [0, 1]: give uint8 pixels or floats in [0, 1]", name)
    return x[None]


def _crop_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Scale (antialiased bicubic) to cover `size`, then centre-crop: A1111's "crop and resize"."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    scale = max(size[0] / h, size[1] / w)
    cover = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    x = F.interpolate(x, size=cover, mode="bicubic", antialias=True, align_corners=False)
    top, left = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]].clamp(0, 1)


def _pixels(image: Any, size: tuple[int, int]) -> Tensor:
    if isinstance(image, Image.Image) and image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(canvas, image)  # transparent pixels read as white
        image = image.convert("RGB")
    return _crop_resize(_to_tensor(image, "image", 3), size)


def _mask_pixels(mask: Any, size: tuple[int, int]) -> Tensor:
    if isinstance(mask, Image.Image):
        if "A" in mask.getbands() and mask.getextrema()[-1][0] < 255:
            message = ("the mask has transparent pixels: give an L or RGB mask (white = repaint), or "
                       "`mask_from_alpha(image)` for OpenAI's convention (transparent = repaint)")  # fmt: skip
            raise UserError(message, "mask_image")
        mask = mask.convert("L")
    elif isinstance(mask, np.ndarray) and mask.ndim == 3:
        mask = mask[..., 0] if mask.shape[-1] in (1, 3) and (mask == mask[..., :1]).all() else mask
    elif isinstance(mask, Tensor) and mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    return _crop_resize(_to_tensor(mask, "mask_image", 1), size)


def mask_from_alpha(image: Image.Image) -> Image.Image:
    """OpenAI's convention → ours: the transparent pixels of an RGBA image (or mask) are the ones
    to repaint. Returns an L mask, white = repaint."""
    if "A" not in image.getbands():
        raise UserError(
            "the mask has no alpha channel: OpenAI's masks mark the region to edit as transparent", "mask_image"
        )
    return Image.eval(image.getchannel("A"), lambda a: 255 - a)


def _mask_at(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """The pixel mask at a latent's size, with a soft edge: the share of each latent pixel's area
    to repaint, widened by one latent pixel (a 3×3 max) so no latent pixel that touches the masked
    region is kept, then smoothed by a 3×3 mean."""
    m = F.adaptive_avg_pool2d(mask, size)
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    return F.avg_pool2d(F.pad(m, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def image_hash(image: Any) -> str:
    """A short hash of an image's pixels (sha256 of its RGB bytes and size), for the PNG metadata: it
    says which source an image-to-image render started from, so it can be repeated."""
    if isinstance(image, Image.Image):
        data, size = image.convert("RGB").tobytes(), image.size
    else:
        array = np.ascontiguousarray(np.asarray(image))
        data, size = array.tobytes(), array.shape
    digest = hashlib.sha256(str(size).encode() + data).hexdigest()
    return digest[:16]


def open_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes of an uploaded/read image → a PIL image, checked: a decodable image of at most
    `max_pixels` pixels (checked from its header, before it is decoded)."""
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
    except Exception as exc:  # PIL raises several kinds for bad data
        message = f"`{name}` is not an image PIL can read (PNG, JPEG, WebP): {type(exc).__name__}"
        raise UserError(message, name) from None
    if w * h > max_pixels:
        raise UserError(f"`{name}` is {w}×{h} px: at most {max_pixels} pixels are accepted; scale it down", name)
    try:
        image.load()
    except Exception as exc:
        raise UserError(f"`{name}` is a damaged image: {type(exc).__name__}", name) from None
    return image


def begin(pipe: Any, source: ImageSource | None, stage: str, noise: Tensor,
          times: list[float]) -> tuple[Tensor, list[float], Keep | None]:  # fmt: skip
    """A stage's starting latents, its times and its inpainting hook: from `noise` and all `times`
    (text-to-image: without a source, or at strength 1 without a mask, exactly as without an image),
    else from the image's latent (`ImageSource.start`)."""
    if source is None:
        return noise, times, None
    strength = source.strength if stage == "prior" else source.decoder_strength
    if strength >= 1 and source.mask is None:
        return noise, times, None
    x0 = (semantic_latents if stage == "prior" else vqgan_latents)(pipe, source, tuple(noise.shape))
    return source.start(x0.to(noise.device), noise, times, strength)


def variations(pipe: Any, image: Any, num_images: int = 4, prompt: str | None = None, **kwargs: Any) -> Any:
    """`num_images` variations of `image`, optionally steered by `prompt`. With an image encoder
    (Stable Cascade): text-to-image conditioned on the image's CLIP embedding (its look and content,
    not its layout); add `image=`/`strength=` in `kwargs` to start from its latent too. Without one
    (Würstchen v2): the image's semantic latent decoded by Stage B with new noise (the Würstchen
    paper's reconstructions), re-noised in Stage C by `strength` (default 0.3: the same objects,
    redrawn)."""
    if isinstance(image, list | tuple):
        raise UserError("variations take one image; call once per image")
    if pipe.image_encoder is not None:
        return pipe(prompt or "", images=[image], num_images_per_prompt=num_images, **kwargs)
    kwargs.setdefault("strength", VARIATION_STRENGTH)
    return pipe(prompt or "", image=image, num_images_per_prompt=num_images, **kwargs)
