"""Stable Cascade's official single files (hub repo stabilityai/stable-cascade) → our models.

What a file is comes from its keys and shapes, never from its name:

| file | kind | keys (Stability-AI/StableCascade `modules/`) |
| --- | --- | --- |
| `stage_c[_lite][_bf16].safetensors` | `stage_c` | `stage_c.py` `StageC`; `clip_txt_mapper` |
| `stage_b[_lite][_bf16].safetensors` | `stage_b` | `stage_b.py` `StageB`; `clip_mapper`, `effnet_mapper` |
| `stage_a.safetensors` | `stage_a` | `stage_a.py` `StageA`: the v2 VQGAN, codebook `vquantizer.codebook` |
| `previewer.safetensors` | `previewer` | `previewer.py`: `blocks.0` … `blocks.24` |
| `effnet_encoder.safetensors` | `effnet` | `effnet.py`: `backbone.*` (torchvision), `mapper.*` |
| `comfyui_checkpoints/*.safetensors` | `comfyui` | ComfyUI's all-in-one layout, split below |

**U-Nets** (Stage B and C) become diffusers' `StableCascadeUNet` keys, which are our `CascadeUNet`'s;
the official modules differ from it only in
- attention: `nn.MultiheadAttention` `….attention.attn.in_proj_weight/bias` (q, k, v stacked along
  dim 0) → `….attention.to_q/to_k/to_v.weight/bias`; `….attention.attn.out_proj` → `….attention.to_out.0`;
- Stage B's pooled-text mapper: `clip_mapper` → `clip_txt_pooled_mapper`
(diffusers' `scripts/convert_stable_cascade.py` and `convert_stable_cascade_lite.py`). Their config
is read from the shapes: widths from `embedding.1` and the downscalers, the block pattern and the
blocks per level from the block indices, the conditionings from the mappers. Full vs lite is then
a match against the four hub configs (`prior/`, `prior_lite/` of stabilityai/stable-cascade-prior,
`decoder/`, `decoder_lite/` of stabilityai/stable-cascade), which come out exactly, heads included.
What the weights cannot tell (attention heads, dropout, patch size) follows the official files
(64 channels a head) unless given.

**Stage A** is the v2 VQGAN: the same keys as v2's `vqgan_f4_v1_500k.pt` and diffusers'
`PaellaVQModel` but for the codebook (`original.convert_stage_a_keys`). Stable Cascade scales its
latent by 0.43 (`modules/stage_a.py` `StageA(scale_factor=0.43)`; ComfyUI's `SC_B` latent format
is 1 / 0.43), not v2's 0.3764: `STAGE_A_CASCADE`.

**ComfyUI bundles** (`comfy/supported_models.py` `Stable_Cascade_C/B`, `comfy/model_detection.py`,
`comfy/sd.py`): the U-Net under `model.diffusion_model.` (the official keys, the attention either as
`in_proj` or already split into `attn.to_q/to_k/to_v`, `attn.out_proj`), the autoencoder under `vae.`
(Stage A for Stage B; for Stage C the effnet under `encoder.` and the previewer under `previewer.`,
or either alone), the text encoder under `text_encoder.clip_g.transformer.` (transformers'
`CLIPTextModelWithProjection` keys: CLIP ViT-bigG/14's text tower, diffusers' `text_encoder`) and, for
Stage C, the image encoder under `clip_l_vision.` (transformers' `CLIPVisionModelWithProjection`
keys: CLIP ViT-L/14, diffusers' `image_encoder`).

Every conversion is strict: a missing, unknown or mis-shaped tensor is a `UserError` naming it.
Tensors keep their dtype (the `_bf16` files stay bfloat16) unless `dtype` is given, and the
conversion only renames and slices (views), so nothing is copied.

Example:
    from wuerstchen.io.cascade_files import load_official_file
    part = load_official_file("stage_c_lite_bf16.safetensors")
    part.kind, part.variant      # ("stage_c", "lite")
    part.config                  # prior_lite/config.json of stabilityai/stable-cascade-prior
    part.state                   # diffusers StableCascadeUNet keys, bfloat16
    bundle = load_official_file("comfyui_checkpoints/stable_cascade_stage_b.safetensors")
    sorted(bundle.parts)         # ["stage_a", "text_encoder", "unet"]
    vqgan = bundle.parts["stage_a"].model()
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models.config import config_from_dict, config_to_dict
from ..models.previewer import Previewer, PreviewerConfig
from ..models.stage_a import STAGE_A_PRESETS, StageA, StageAConfig
from .checkpoint import build_from_state, check_shapes, check_state_dict, load_tensors
from .original import convert_attention_keys, convert_stage_a_keys

State = Mapping[str, torch.Tensor]

UNET_CLASS = "StableCascadeUNet"
RES, TIME, ATTN = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
HEAD_DIM = 64  # channels per attention head in every official U-Net
CONDS = ("sca", "crp")  # the timestep conditionings, in the order the official models chunk them

# The official VQGAN with Stable Cascade's latent scale.
STAGE_A_CASCADE = dataclasses.replace(STAGE_A_PRESETS["official-v2"], scale_factor=0.43)

# ComfyUI's prefixes in an all-in-one checkpoint.
COMFY_UNET, COMFY_VAE, COMFY_TEXT, COMFY_VISION = "model.diffusion_model.", "vae.", "text_encoder.", "clip_l_vision."
TEXT_ENCODER_CLASS, IMAGE_ENCODER_CLASS = "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"


def _unet_config(**fields: Any) -> dict[str, Any]:
    """A `config.json` dict of diffusers' StableCascadeUNet, its fields in the constructor's order."""
    order = (
        "in_channels out_channels timestep_ratio_embedding_dim patch_size conditioning_dim block_out_channels "
        "num_attention_heads down_num_layers_per_block up_num_layers_per_block down_blocks_repeat_mappers "
        "up_blocks_repeat_mappers block_types_per_layer clip_text_in_channels clip_text_pooled_in_channels "
        "clip_image_in_channels clip_seq effnet_in_channels pixel_mapper_in_channels kernel_size dropout "
        "self_attn timestep_conditioning_type switch_level"
    ).split()
    assert sorted(order) == sorted(fields), sorted(set(order) ^ set(fields))
    return {"_class_name": UNET_CLASS, **{name: fields[name] for name in order}}


def _stage_c_hub(width: int, layers: tuple[int, int]) -> dict[str, Any]:
    return _unet_config(
        in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=width,
        block_out_channels=[width, width], num_attention_heads=[width // HEAD_DIM] * 2,
        down_num_layers_per_block=list(layers), up_num_layers_per_block=list(layers[::-1]),
        down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
        block_types_per_layer=[[RES, TIME, ATTN]] * 2,
        clip_text_in_channels=1280, clip_text_pooled_in_channels=1280, clip_image_in_channels=768, clip_seq=4,
        effnet_in_channels=None, pixel_mapper_in_channels=None, kernel_size=3, dropout=[0.1, 0.1], self_attn=True,
        timestep_conditioning_type=list(CONDS), switch_level=[False],
    )  # fmt: skip


def _stage_b_hub(widths: list[int], heads: list[int], layers: list[int], up_repeat: list[int]) -> dict[str, Any]:
    return _unet_config(
        in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=1280,
        block_out_channels=widths, num_attention_heads=heads, down_num_layers_per_block=layers,
        up_num_layers_per_block=layers[::-1], down_blocks_repeat_mappers=[1, 1, 1, 1],
        up_blocks_repeat_mappers=up_repeat,
        block_types_per_layer=[[RES, TIME], [RES, TIME], [RES, TIME, ATTN], [RES, TIME, ATTN]],
        clip_text_in_channels=None, clip_text_pooled_in_channels=1280, clip_image_in_channels=None, clip_seq=4,
        effnet_in_channels=16, pixel_mapper_in_channels=3, kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True,
        timestep_conditioning_type=["sca"], switch_level=None,
    )  # fmt: skip


# (stage, variant) → the hub config.json, from diffusers' conversion scripts (the hub folders were
# written by them) and the official training code (train/train_c.py 3.6B / 1B, train/train_b.py
# 3B / 700M). The lite decoder's 9 heads at level 1 are unused: that level has no attention.
HUB_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("stage_c", "full"): _stage_c_hub(2048, (8, 24)),  # stable-cascade-prior prior/
    ("stage_c", "lite"): _stage_c_hub(1536, (4, 12)),  # stable-cascade-prior prior_lite/
    ("stage_b", "full"): _stage_b_hub([320, 640, 1280, 1280], [0, 0, 20, 20], [2, 6, 28, 6], [3, 3, 2, 2]),
    ("stage_b", "lite"): _stage_b_hub([320, 576, 1152, 1152], [0, 9, 18, 18], [2, 4, 14, 4], [2, 2, 2, 2]),
}


# --- U-Net: keys -------------------------------------------------------------------------------


def official_unet_keys_to_diffusers(state: State, stage: str, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename (and split q/k/v of) the official or ComfyUI U-Net keys to diffusers'; `stage` "b"/"c"."""
    out: dict[str, torch.Tensor] = {}
    for key, value in convert_attention_keys(dict(state)).items():
        key = key.replace(".attention.attn.to_", ".attention.to_")  # ComfyUI's q/k/v, already split
        if stage == "b" and key.startswith("clip_mapper."):
            key = "clip_txt_pooled_mapper." + key.removeprefix("clip_mapper.")
        if key in out:
            raise UserError(f"{source}: two tensors become {key}; the file mixes two layouts")
        out[key] = value
    return out


def unet_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of diffusers' StableCascadeUNet(**config): key → shape, without building it."""
    c = config
    widths, cond, seq, p = c["block_out_channels"], c["conditioning_dim"], c["clip_seq"], c["patch_size"]
    levels, k, c_r = len(widths), c["kernel_size"], c["timestep_ratio_embedding_dim"]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def conv(name: str, n_out: int, n_in: int, size: int, transposed: bool = False) -> None:
        shapes[f"{name}.weight"] = (n_in, n_out, size, size) if transposed else (n_out, n_in, size, size)
        shapes[f"{name}.bias"] = (n_out,)

    def block(prefix: str, kind: str, width: int, skip: int) -> None:
        if kind == RES:
            shapes[f"{prefix}.depthwise.weight"], shapes[f"{prefix}.depthwise.bias"] = (width, 1, k, k), (width,)
            linear(f"{prefix}.channelwise.0", 4 * width, width + skip)
            shapes[f"{prefix}.channelwise.2.gamma"] = shapes[f"{prefix}.channelwise.2.beta"] = (1, 1, 1, 4 * width)
            linear(f"{prefix}.channelwise.4", width, 4 * width)
        elif kind == TIME:
            for name in ["mapper", *(f"mapper_{n}" for n in c["timestep_conditioning_type"])]:
                linear(f"{prefix}.{name}", 2 * width, c_r)
        else:
            for name in ("to_q", "to_k", "to_v", "to_out.0"):
                linear(f"{prefix}.attention.{name}", width, width)
            linear(f"{prefix}.kv_mapper.1", width, cond)

    for name, n_in in (("effnet_mapper", c["effnet_in_channels"]), ("pixels_mapper", c["pixel_mapper_in_channels"])):
        if n_in is not None:
            conv(f"{name}.0", 4 * widths[0], n_in, 1)
            conv(f"{name}.2", widths[0], 4 * widths[0], 1)
    linear("clip_txt_pooled_mapper", cond * seq, c["clip_text_pooled_in_channels"])
    if c["clip_text_in_channels"] is not None:
        linear("clip_txt_mapper", cond, c["clip_text_in_channels"])
    if c["clip_image_in_channels"] is not None:
        linear("clip_img_mapper", cond * seq, c["clip_image_in_channels"])
    conv("embedding.1", widths[0], c["in_channels"] * p * p, 1)
    switch = c["switch_level"] is not None  # 1×1 conv + resampling, else a stride-2 (transposed) conv
    ups = list(reversed(range(levels)))  # up_blocks[j] works at level ups[j]
    for i in range(levels):
        kinds = c["block_types_per_layer"][i]
        if i > 0 and switch:
            conv(f"down_downscalers.{i}.1.blocks.0", widths[i], widths[i - 1], 1)
        elif i > 0:
            conv(f"down_downscalers.{i}.1", widths[i], widths[i - 1], 2)
        for n in range(c["down_num_layers_per_block"][i] * len(kinds)):
            block(f"down_blocks.{i}.{n}", kinds[n % len(kinds)], widths[i], 0)
        for r in range(c["down_blocks_repeat_mappers"][i] - 1):
            conv(f"down_repeat_mappers.{i}.{r}", widths[i], widths[i], 1)
    for j, i in enumerate(ups):
        kinds = c["block_types_per_layer"][i]
        if i > 0 and switch:
            conv(f"up_upscalers.{j}.1.blocks.1", widths[i - 1], widths[i], 1)
        elif i > 0:
            conv(f"up_upscalers.{j}.1", widths[i - 1], widths[i], 2, transposed=True)
        for n in range(c["up_num_layers_per_block"][j] * len(kinds)):
            skip = widths[i] if i < levels - 1 and n == 0 else 0  # the level's skip joins its first block
            block(f"up_blocks.{j}.{n}", kinds[n % len(kinds)], widths[i], skip)
        for r in range(c["up_blocks_repeat_mappers"][j] - 1):
            conv(f"up_repeat_mappers.{j}.{r}", widths[i], widths[i], 1)
    conv("clf.1", c["out_channels"] * p * p, widths[0], 1)
    return shapes


# --- U-Net: config from the shapes -------------------------------------------------------------


class _Reader:
    """Shape look-ups in one (diffusers-named) state dict, with errors that name the file."""

    def __init__(self, state: State, source: str) -> None:
        self.state, self.source = state, source
        self.children: dict[str, dict[int, set[str]]] = {}
        for key in state:
            parts = key.split(".")
            for depth in range(1, len(parts) - 1):
                if parts[depth].isdigit():
                    prefix = ".".join(parts[:depth])
                    self.children.setdefault(prefix, {}).setdefault(int(parts[depth]), set()).add(
                        ".".join(parts[depth + 1 :])
                    )

    def shape(self, *keys: str) -> tuple[int, ...]:
        for key in keys:
            if key in self.state:
                return tuple(self.state[key].shape)
        raise UserError(f"{self.source}: no tensor {' or '.join(keys)}; the file is incomplete or not this kind")

    def optional(self, key: str, dim: int) -> int | None:
        return self.state[key].shape[dim] if key in self.state else None

    def count(self, prefix: str) -> int:
        """How many `prefix.N.…` children there are (N = 0, 1, … without gaps)."""
        found = self.children.get(prefix, {})
        if found and sorted(found) != list(range(len(found))):
            gaps = sorted(set(range(max(found) + 1)) - set(found))
            raise UserError(f"{self.source}: no tensors for {prefix}.{gaps[0]}; the file is incomplete")
        return len(found)

    def kinds(self, prefix: str) -> list[str]:
        """The block type of each `prefix.N`, from the names of its tensors."""
        out = []
        for n in range(self.count(prefix)):
            subs = self.children[prefix][n]
            if any(s.startswith("depthwise.") for s in subs):
                out.append(RES)
            elif any(s.startswith("mapper") for s in subs):
                out.append(TIME)
            elif any(s.startswith(("attention.", "kv_mapper.")) for s in subs):
                out.append(ATTN)
            elif any(s.startswith("channelwise.") for s in subs):
                raise UserError(f"{self.source}: {prefix}.{n} is a feed-forward block, which StableCascadeUNet lacks")
            else:
                raise UserError(f"{self.source}: cannot tell what block {prefix}.{n} is (tensors {sorted(subs)[:4]})")
        return out

    def first(self, blocks: Iterable[str], suffix: str) -> tuple[str, tuple[int, ...]] | None:
        for prefix in blocks:
            if f"{prefix}.{suffix}" in self.state:
                return prefix, tuple(self.state[f"{prefix}.{suffix}"].shape)
        return None


def _pattern(seq: list[str]) -> list[str]:
    """The shortest run of block types that `seq` repeats (one layer of a level)."""
    for size in range(1, len(seq) + 1):
        if len(seq) % size == 0 and seq == seq[:size] * (len(seq) // size):
            return seq[:size]
    return seq


def infer_unet_config(
    state: State,
    stage: str,
    source: str = "state dict",
    patch_size: int | None = None,
    num_attention_heads: list[int] | None = None,
) -> tuple[dict[str, Any], str]:
    """(diffusers config.json dict, variant "full" | "lite" | "custom") of a diffusers-named U-Net."""
    r = _Reader(state, source)
    levels = r.count("down_blocks")
    if levels == 0 or r.count("up_blocks") != levels:
        raise UserError(f"{source}: {levels} down but {r.count('up_blocks')} up levels; not a Stable Cascade U-Net")
    widths = [r.shape("embedding.1.weight")[0]]
    for i in range(1, levels):
        down = f"down_downscalers.{i}.1"
        widths.append(r.shape(f"{down}.weight", f"{down}.blocks.0.weight")[0])
    switch = [False] * (levels - 1) if "down_downscalers.1.1.blocks.0.weight" in state else None
    types, down_layers, up_layers = [], [], []
    for i in range(levels):
        down, up = r.kinds(f"down_blocks.{i}"), r.kinds(f"up_blocks.{levels - 1 - i}")
        pattern = _pattern(down or up)
        if not pattern or pattern * (len(up) // len(pattern)) != up:
            raise UserError(f"{source}: the blocks of level {i} do not repeat one pattern ({down[:4]} / {up[:4]})")
        types.append(pattern)
        down_layers.append(len(down) // len(pattern))
        up_layers.insert(0, len(up) // len(pattern))
    blocks = [
        f"{lvl}.{n}" for lvl in r.children if lvl.startswith(("down_blocks.", "up_blocks.")) for n in r.children[lvl]
    ]
    res, time = r.first(blocks, "depthwise.weight"), r.first(blocks, "mapper.weight")
    if res is None or time is None:
        raise UserError(f"{source}: no residual or no timestep block with its weights; not a Stable Cascade U-Net")
    conds = {k.rsplit(".", 2)[1].removeprefix("mapper_") for k in state if "_blocks." in k and ".mapper_" in k}
    if not conds <= set(CONDS):
        raise UserError(f"{source}: unknown timestep conditionings {sorted(conds - set(CONDS))} (known: {CONDS})")
    attn = r.first(blocks, "kv_mapper.1.weight")
    pooled = r.shape("clip_txt_pooled_mapper.weight")
    text_in = r.optional("clip_txt_mapper.weight", 1)
    cond = r.shape("clip_txt_mapper.weight")[0] if text_in is not None else attn[1][1] if attn else pooled[0] // 4
    patch = patch_size if patch_size is not None else {"c": 1, "b": 2}[stage]
    embed_in, clf_out = r.shape("embedding.1.weight")[1], r.shape("clf.1.weight")[0]
    if embed_in % (patch * patch) or clf_out % (patch * patch):
        raise UserError(f"{source}: {embed_in} input channels do not fit patch size {patch}; pass patch_size")
    if pooled[0] % cond:
        raise UserError(f"{source}: clip_txt_pooled_mapper's {pooled[0]} outputs are no multiple of {cond}")
    heads = [w // HEAD_DIM if ATTN in t else 0 for w, t in zip(widths, types, strict=True)]
    config = _unet_config(
        in_channels=embed_in // patch**2, out_channels=clf_out // patch**2, timestep_ratio_embedding_dim=time[1][1],
        patch_size=patch, conditioning_dim=cond, block_out_channels=widths, num_attention_heads=heads,
        down_num_layers_per_block=down_layers, up_num_layers_per_block=up_layers,
        down_blocks_repeat_mappers=[r.count(f"down_repeat_mappers.{i}") + 1 for i in range(levels)],
        up_blocks_repeat_mappers=[r.count(f"up_repeat_mappers.{j}") + 1 for j in range(levels)],
        block_types_per_layer=types, clip_text_in_channels=text_in, clip_text_pooled_in_channels=pooled[1],
        clip_image_in_channels=r.optional("clip_img_mapper.weight", 1), clip_seq=pooled[0] // cond,
        effnet_in_channels=r.optional("effnet_mapper.0.weight", 1),
        pixel_mapper_in_channels=r.optional("pixels_mapper.0.weight", 1), kernel_size=res[1][-1],
        dropout=[0.1 if ATTN in t else 0 for t in types], self_attn=True,
        timestep_conditioning_type=[n for n in CONDS if n in conds], switch_level=switch,
    )  # fmt: skip
    variant = "custom"
    for (kind, name), hub in HUB_CONFIGS.items():
        if kind == f"stage_{stage}" and {**config, "num_attention_heads": hub["num_attention_heads"]} == hub:
            config, variant = copy.deepcopy(hub), name
    if num_attention_heads is not None and list(num_attention_heads) != config["num_attention_heads"]:
        config["num_attention_heads"], variant = list(num_attention_heads), "custom"
    for w, h, t in zip(widths, config["num_attention_heads"], types, strict=True):
        if ATTN in t and (h <= 0 or w % h):
            raise UserError(f"{source}: {h} attention heads do not divide {w} channels; pass num_attention_heads")
    return config, variant


def _convert_unet(
    state: State,
    stage: str,
    dtype: torch.dtype | None = None,
    source: str = "state dict",
    patch_size: int | None = None,
    num_attention_heads: list[int] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    other = "b" if stage == "c" else "c"
    hint = f"; if it is a Stage {other.upper()} file, use convert_stage_{other}_official"
    if ("clip_txt_mapper.weight" in state) != (stage == "c"):  # only the prior maps the text tokens
        has = "has no" if stage == "c" else "has a"
        raise UserError(f"{source}: not a Stage {stage.upper()} U-Net (it {has} clip_txt_mapper){hint}")
    converted = official_unet_keys_to_diffusers(state, stage, source)
    config, variant = infer_unet_config(converted, stage, source, patch_size, num_attention_heads)
    check_shapes(unet_shapes(config), converted, source, f"a Stage {stage.upper()} StableCascadeUNet", hint)
    return config, _cast(converted, dtype), variant


def convert_stage_c_official(
    state: State, dtype: torch.dtype | None = None, **options: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Official (or ComfyUI) Stage C keys → (diffusers config.json dict, StableCascadeUNet state dict).
    Options: `source` (the name errors give), `patch_size`, `num_attention_heads` (not in the weights)."""
    return _convert_unet(state, "c", dtype, **options)[:2]


def convert_stage_b_official(
    state: State, dtype: torch.dtype | None = None, **options: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`convert_stage_c_official` for Stage B (the decoder)."""
    return _convert_unet(state, "b", dtype, **options)[:2]


# --- Stage A, previewer ------------------------------------------------------------------------


def stage_a_config_from_state(state: State, source: str = "state dict") -> StageAConfig:
    """The VQGAN's sizes from its (diffusers- or official-named) tensors, with Stable Cascade's scale."""
    r = _Reader(state, source)
    levels = r.count("down_blocks") // 2  # a mixing block per level, a conv between, the latent head
    latent = r.shape(f"down_blocks.{2 * levels - 1}.0.weight")
    codebook = r.shape("vquantizer.embedding.weight", "vquantizer.codebook.weight")
    f = STAGE_A_CASCADE.up_down_scale_factor
    return dataclasses.replace(
        STAGE_A_CASCADE,
        in_channels=r.shape("in_block.1.weight")[1] // f**2,
        out_channels=r.shape("out_block.0.weight")[0] // f**2,
        levels=levels,
        bottleneck_blocks=r.count("up_blocks") - 1 - 2 * (levels - 1),
        embed_dim=latent[1],
        latent_channels=latent[0],
        num_vq_embeddings=codebook[0],
    )


def convert_stage_a_official(
    state: State, dtype: torch.dtype | None = None, source: str = "state dict"
) -> tuple[StageAConfig, dict[str, torch.Tensor]]:
    """Official `stage_a.safetensors` → (our StageA config, PaellaVQModel / StageA state dict)."""
    converted = convert_stage_a_keys(dict(state))
    config = stage_a_config_from_state(converted, source)
    with torch.device("meta"):
        check_state_dict(StageA(config), converted, source)
    return config, _cast(converted, dtype)


def convert_previewer_official(
    state: State, dtype: torch.dtype | None = None, source: str = "state dict"
) -> tuple[PreviewerConfig, dict[str, torch.Tensor]]:
    """Official `previewer.safetensors` → (config, state dict); the keys are already ours."""
    r = _Reader(state, source)
    first, last = r.shape("blocks.0.weight"), r.shape(f"blocks.{3 * 8}.weight")
    config = PreviewerConfig(c_in=first[1], c_hidden=first[0], c_out=last[0])
    with torch.device("meta"):
        check_state_dict(Previewer(config), dict(state), source)
    return config, _cast(dict(state), dtype)


def load_previewer(path: str | Path, dtype: torch.dtype | None = None) -> Previewer:
    config, state = convert_previewer_official(load_tensors(path), source=str(path))
    return build_from_state(Previewer, config, state, str(path), dtype)


# --- ComfyUI bundles ---------------------------------------------------------------------------


def _clip_keys(state: State, source: str, prefix: str) -> dict[str, torch.Tensor]:
    """ComfyUI's CLIP tower → transformers' keys; its `logit_scale` and `position_ids` are dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("position_ids") or key == "clip_g.logit_scale":
            continue
        if key == "clip_g.text_projection":  # older ComfyUI: a (hidden, projection) matrix, x @ P
            out["text_projection.weight"] = value.t()
        elif key.startswith("clip_g.transformer."):
            out[key.removeprefix("clip_g.transformer.")] = value
        elif prefix == COMFY_VISION and key.startswith(("vision_model.", "visual_projection.")):
            out[key] = value
        elif prefix == COMFY_VISION and key.startswith("transformer.resblocks."):
            raise UserError(f"{source}: its image encoder is in OpenCLIP's layout, which is not supported yet")
        else:
            raise UserError(f"{source}: unknown tensor {prefix}{key} in a ComfyUI checkpoint")
    return out


# part → (transformers class, its tower, the tower's last norm, the projection)
CLIP_TOWERS = {
    "text_encoder": (TEXT_ENCODER_CLASS, "text_model", "final_layer_norm", "text_projection"),
    "image_encoder": (IMAGE_ENCODER_CLASS, "vision_model", "post_layernorm", "visual_projection"),
}


def _clip_part(state: dict[str, torch.Tensor], kind: str, source: str) -> OfficialFile:
    """A CLIP tower's part; its `config` holds the sizes its weights tell (the rest is the hub model's)."""
    name, tower, norm, projection = CLIP_TOWERS[kind]
    r = _Reader(state, source)
    config = {
        "_class_name": name,
        "hidden_size": r.shape(f"{tower}.{norm}.weight")[0],
        "num_hidden_layers": r.count(f"{tower}.encoder.layers"),
        "projection_dim": r.shape(f"{projection}.weight")[0],
    }
    return OfficialFile(kind, None, config, state, source=source)


def split_comfyui_bundle(state: State, source: str = "state dict") -> dict[str, OfficialFile]:
    """A ComfyUI all-in-one Stable Cascade checkpoint → its parts, each converted to our keys:
    "unet" (stage_b / stage_c), "stage_a", "previewer", "effnet" (the semantic compressor),
    "text_encoder" and "image_encoder" (transformers' CLIP keys; `config` holds their sizes)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix = next((p for p in (COMFY_UNET, COMFY_VAE, COMFY_TEXT, COMFY_VISION) if key.startswith(p)), None)
        if prefix is None:
            raise UserError(f"{source}: unknown tensor {key} in a ComfyUI checkpoint; is it a Stable Cascade one?")
        groups.setdefault(prefix, {})[key.removeprefix(prefix)] = value
    parts: dict[str, OfficialFile] = {}
    unet = detect_official_file(groups.get(COMFY_UNET, {}), f"{source} [{COMFY_UNET}]")
    if unet.kind not in ("stage_b", "stage_c"):
        raise UserError(f"{source}: {COMFY_UNET} holds a {unet.kind}, not a Stable Cascade U-Net")
    parts["unet"] = unet
    vae = groups.get(COMFY_VAE, {})
    coder = {"encoder.": "effnet", "previewer.": "previewer"}  # ComfyUI's StageC_coder: both in one
    if vae and all(k.startswith(tuple(coder)) for k in vae):
        for sub, name in coder.items():
            if any(k.startswith(sub) for k in vae):
                part = {k.removeprefix(sub): v for k, v in vae.items() if k.startswith(sub)}
                parts[name] = detect_official_file(part, f"{source} [{COMFY_VAE}{sub}]")
    elif vae:
        part = detect_official_file(vae, f"{source} [{COMFY_VAE}]")
        parts[part.kind] = part
    for prefix, kind in ((COMFY_TEXT, "text_encoder"), (COMFY_VISION, "image_encoder")):
        if prefix in groups:
            parts[kind] = _clip_part(_clip_keys(groups[prefix], source, prefix), kind, f"{source} [{prefix}]")
    return parts


# --- what a file is ----------------------------------------------------------------------------


@dataclass
class OfficialFile:
    """One detected file (or part of a bundle), its tensors already under our keys.

    kind: "stage_c" | "stage_b" | "stage_a" | "previewer" | "effnet" | "text_encoder" |
    "image_encoder" | "comfyui"; variant: "full" | "lite" | "custom" for the U-Nets, "stable-cascade"
    or "v2" for an effnet, else None; config: the diffusers config.json dict (U-Nets; Stage A and
    the previewer: our config's dict); parts: a bundle's parts by name."""

    kind: str
    variant: str | None
    config: dict[str, Any] | None
    state: dict[str, torch.Tensor]
    parts: dict[str, OfficialFile] = field(default_factory=dict)
    source: str = "state dict"

    def describe(self) -> str:
        if self.parts:
            return "comfyui bundle: " + ", ".join(f"{n} = {p.describe()}" for n, p in self.parts.items())
        if self.kind in CLIP_TOWERS and self.config:
            return f"{self.kind} ({self.config['_class_name']}, {self.config['num_hidden_layers']} layers)"
        return " ".join(x for x in (self.kind, self.variant) if x)

    def model(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
        """Our model with these weights (assigned, not copied): StageA, Previewer or CascadeUNet."""
        if self.kind == "stage_a":
            cls, config = StageA, config_from_dict(StageAConfig, self.config, self.source)
        elif self.kind == "previewer":
            cls, config = Previewer, config_from_dict(PreviewerConfig, self.config, self.source)
        elif self.kind in ("stage_b", "stage_c"):
            from ..models.cascade import CascadeUNet, CascadeUNetConfig

            cls, config = CascadeUNet, config_from_dict(CascadeUNetConfig, self.config, self.source)
        elif self.kind == "effnet":
            from ..models.semantic import SEMANTIC_PRESETS, SemanticCompressor

            preset = "stable-cascade" if self.variant == "stable-cascade" else "official-v2"
            return build_from_state(SemanticCompressor, SEMANTIC_PRESETS[preset], _effnet_state(self), self.source,
                                    dtype, device)  # fmt: skip
        else:
            name = (self.config or {}).get("_class_name", self.kind)
            raise UserError(f"{self.source}: no model of ours; build transformers' {name} and load .state into it")
        return build_from_state(cls, config, self.state, self.source, dtype, device)


def _effnet_state(found: OfficialFile) -> dict[str, torch.Tensor]:
    """The effnet's tensors as SemanticCompressor's (the same keys). ComfyUI's encoder also stores
    the ImageNet normalisation as `mean`/`std`, which ours applies as constants: checked, dropped."""
    from ..models.semantic import IMAGENET_MEAN, IMAGENET_STD

    state = dict(found.state)
    for key, want in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = state.pop(key, None)
        if value is not None and not torch.allclose(value.float().flatten(), torch.tensor(want), atol=1e-3):
            raise UserError(f"{found.source}: the effnet normalises with {key} {value.tolist()}, not ImageNet's {want}")
    return state


def detect_official_file(state: State, source: str = "state dict") -> OfficialFile:
    """What these tensors are, from their keys and shapes, converted to our keys (views, no copies;
    meta tensors work, so a header is enough). Unknown layouts are a UserError."""
    keys = set(state)
    if any(k.startswith(COMFY_UNET) for k in keys):
        parts = split_comfyui_bundle(state, source)
        return OfficialFile("comfyui", None, None, {}, parts, source)
    if "clf.1.weight" in keys and "clip_txt_mapper.weight" in keys:
        config, converted, variant = _convert_unet(state, "c", source=source)
        return OfficialFile("stage_c", variant, config, converted, source=source)
    if "clf.1.weight" in keys and ({"clip_mapper.weight", "effnet_mapper.0.weight"} & keys):
        config, converted, variant = _convert_unet(state, "b", source=source)
        return OfficialFile("stage_b", variant, config, converted, source=source)
    if "in_block.1.weight" in keys and {"vquantizer.codebook.weight", "vquantizer.embedding.weight"} & keys:
        config_a, converted = convert_stage_a_official(state, source=source)
        return OfficialFile("stage_a", None, config_to_dict(config_a, StageA.diffusers_class), converted, source=source)
    if "mapper.0.weight" in keys and any(k.startswith("backbone.") for k in keys):
        variant = "v2" if "mapper.1.weight" in keys else "stable-cascade"  # SC's BatchNorm has no affine
        return OfficialFile("effnet", variant, None, dict(state), source=source)
    if "blocks.0.weight" in keys and all(k.startswith("blocks.") for k in keys):
        config_p, converted = convert_previewer_official(state, source=source)
        config = config_to_dict(config_p, Previewer.diffusers_class)
        return OfficialFile("previewer", None, config, converted, source=source)
    raise UserError(
        f"{source}: not a Stable Cascade file this knows (stage_a/b/c, previewer, effnet, ComfyUI bundle); "
        f"its first keys are {sorted(keys)[:4]}"
    )


def load_official_file(path: str | Path, dtype: torch.dtype | None = None) -> OfficialFile:
    """Read an official (or ComfyUI) Stable Cascade .safetensors file: detect it and convert it.
    `dtype` casts the floating tensors; by default they keep the file's dtype."""
    found = detect_official_file(load_tensors(path), str(path))
    if dtype is not None:
        found = _cast_file(found, dtype)
    return found


def _cast_file(found: OfficialFile, dtype: torch.dtype) -> OfficialFile:
    parts = {name: _cast_file(part, dtype) for name, part in found.parts.items()}
    return dataclasses.replace(found, state=_cast(found.state, dtype), parts=parts)


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return dict(state)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


# --- a whole pipeline ------------------------------------------------------------------------------


def _part(path: str | Path, kind: str, dtype: torch.dtype | None, options: dict[str, Any]) -> OfficialFile:
    """The `kind` part of an official file or of a ComfyUI bundle; `options` for a U-Net say what
    its weights cannot (`num_attention_heads`, `patch_size`)."""
    raw = load_tensors(path)
    if kind in ("stage_b", "stage_c") and options:
        if any(k.startswith(COMFY_UNET) for k in raw):
            raw = {k[len(COMFY_UNET) :]: v for k, v in raw.items() if k.startswith(COMFY_UNET)}
        config, state, variant = _convert_unet(raw, kind[-1], None, str(path), **options)
        found = OfficialFile(kind, variant, config, state, source=str(path))
    else:
        found = detect_official_file(raw, str(path))
    if found.kind == "comfyui":
        found = next((p for p in found.parts.values() if p.kind == kind), found)
    if found.kind != kind:
        raise UserError(f"{path} holds {found.describe()}, not {kind.replace('_', ' ')}: check which file goes where")
    return _cast_file(found, dtype) if dtype is not None else found


def convert_cascade_files(
    output: str | Path,
    stage_c: str | Path,
    stage_b: str | Path,
    stage_a: str | Path,
    text_encoder: str | Path,
    tokenizer: str | Path | None = None,
    image_encoder: str | Path | None = None,
    previewer: str | Path | None = None,
    dtype: torch.dtype | None = None,
    effnet: str | Path | None = None,
    stage_c_options: dict[str, Any] | None = None,
    stage_b_options: dict[str, Any] | None = None,
) -> Path:
    """Stable Cascade's official single files (or ComfyUI bundles) → one combined pipeline folder.

    The files hold no text encoder: `text_encoder` is a CLIP ViT-bigG/14 `CLIPTextModelWithProjection`
    folder (the hub's stabilityai/stable-cascade `text_encoder/`), read by both stages; `tokenizer`
    defaults to that folder, or to a `tokenizer/` beside it. `image_encoder`: a
    `CLIPVisionModelWithProjection` folder (the prior repo's `image_encoder/`), for image variations;
    its image processor is read from the folder, or a `feature_extractor/` beside it, else CLIP's
    defaults. `previewer`: `previewer.safetensors`, for the UI's Stage C previews. `effnet`:
    `effnet_encoder.safetensors` (or a ComfyUI Stage C bundle that holds it), the semantic
    compressor that image-to-image and inpainting need.

        convert_cascade_files("models/stable-cascade-lite", "stage_c_lite_bf16.safetensors",
                              "stage_b_lite_bf16.safetensors", "stage_a.safetensors",
                              "models/stable-cascade/text_encoder")
    """
    from ..parts import PipelineSettings
    from ..pipeline import WuerstchenPipeline
    from .folders import load_image_encoder, load_image_processor, load_text_encoder, load_tokenizer, resolve_folder

    prior = _part(stage_c, "stage_c", dtype, stage_c_options or {}).model()
    decoder = _part(stage_b, "stage_b", dtype, stage_b_options or {}).model()
    vqgan = _part(stage_a, "stage_a", dtype, {}).model()
    text_dir = resolve_folder(text_encoder)
    encoder = load_text_encoder(text_dir, "CLIPTextModelWithProjection", dtype)
    tok_dir = Path(tokenizer) if tokenizer is not None else text_dir
    if (
        tokenizer is None
        and not (tok_dir / "tokenizer_config.json").exists()
        and (text_dir.parent / "tokenizer").is_dir()
    ):
        tok_dir = text_dir.parent / "tokenizer"
    image, processor = None, None
    if image_encoder is not None:
        image_dir = resolve_folder(image_encoder)
        image = load_image_encoder(image_dir, None, dtype)
        beside = image_dir.parent / "feature_extractor"
        processor_dir = image_dir if (image_dir / "preprocessor_config.json").exists() else beside
        if (processor_dir / "preprocessor_config.json").exists():
            processor = load_image_processor(processor_dir, None)
        else:
            import transformers

            processor = transformers.CLIPImageProcessor()  # CLIP's 224-px defaults, the hub's settings
    pipe = WuerstchenPipeline(
        prior=prior, prior_text_encoder=encoder, prior_tokenizer=load_tokenizer(tok_dir, None),
        decoder=decoder, text_encoder=encoder, tokenizer=load_tokenizer(tok_dir, None), vqgan=vqgan,
        settings=PipelineSettings(default_size=1024), image_encoder=image, feature_extractor=processor,
        previewer=None if previewer is None else _part(previewer, "previewer", dtype, {}).model(),
        semantic=None if effnet is None else _part(effnet, "effnet", dtype, {}).model(),
    )  # fmt: skip
    pipe.save_pretrained(output)
    return Path(output)
