"""Stable Cascade's official single files: tiny random diffusers models written under the official
key names (by this file's own inverse mapping) convert back exactly; the four hub configs are
detected from shapes alone (meta tensors); Stage A, the previewer, the effnet and ComfyUI bundles."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from tiny import kwargs_of

from wuerstchen.errors import UserError
from wuerstchen.io.cascade_files import (
    HUB_CONFIGS,
    convert_stage_b_official,
    convert_stage_c_official,
    detect_official_file,
    load_official_file,
    load_previewer,
    unet_shapes,
)
from wuerstchen.models.previewer import PREVIEWER_PRESETS, Previewer
from wuerstchen.models.stage_a import STAGE_A_PRESETS
from wuerstchen.testing import randomize

R, T, A = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"

# The four hub models, as diffusers' scripts/convert_stable_cascade.py and
# convert_stable_cascade_lite.py build them (their save_pretrained wrote the hub folders).
PRIOR = dict(
    in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=2048,
    block_out_channels=[2048, 2048], num_attention_heads=[32, 32], down_num_layers_per_block=[8, 24],
    up_num_layers_per_block=[24, 8], down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[[R, T, A], [R, T, A]], clip_text_in_channels=1280, clip_text_pooled_in_channels=1280,
    clip_image_in_channels=768, clip_seq=4, kernel_size=3, dropout=[0.1, 0.1], self_attn=True,
    timestep_conditioning_type=["sca", "crp"], switch_level=[False],
)  # fmt: skip
PRIOR_LITE = dict(
    PRIOR, conditioning_dim=1536, block_out_channels=[1536, 1536], num_attention_heads=[24, 24],
    down_num_layers_per_block=[4, 12], up_num_layers_per_block=[12, 4],
)  # fmt: skip
DECODER = dict(
    in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=1280,
    block_out_channels=[320, 640, 1280, 1280], down_num_layers_per_block=[2, 6, 28, 6],
    up_num_layers_per_block=[6, 28, 6, 2], down_blocks_repeat_mappers=[1, 1, 1, 1],
    up_blocks_repeat_mappers=[3, 3, 2, 2],
    num_attention_heads=[0, 0, 20, 20], block_types_per_layer=[[R, T], [R, T], [R, T, A], [R, T, A]],
    clip_text_pooled_in_channels=1280, clip_seq=4, effnet_in_channels=16, pixel_mapper_in_channels=3, kernel_size=3,
    dropout=[0, 0, 0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca"],
)  # fmt: skip
DECODER_LITE = dict(
    DECODER, block_out_channels=[320, 576, 1152, 1152], down_num_layers_per_block=[2, 4, 14, 4],
    up_num_layers_per_block=[4, 14, 4, 2], up_blocks_repeat_mappers=[2, 2, 2, 2], num_attention_heads=[0, 9, 18, 18],
)  # fmt: skip
HUB = {("stage_c", "full"): PRIOR, ("stage_c", "lite"): PRIOR_LITE}
HUB |= {("stage_b", "full"): DECODER, ("stage_b", "lite"): DECODER_LITE}

# Tiny ones that keep every feature: repeat mappers down and up, skips, several conditionings.
TINY_C = dict(
    PRIOR, timestep_ratio_embedding_dim=8, conditioning_dim=32, block_out_channels=[64, 64], num_attention_heads=[1, 1],
    down_num_layers_per_block=[1, 2], up_num_layers_per_block=[2, 1], down_blocks_repeat_mappers=[1, 2],
    up_blocks_repeat_mappers=[2, 1], clip_text_in_channels=24, clip_text_pooled_in_channels=20,
    clip_image_in_channels=12, clip_seq=2,
)  # fmt: skip
TINY_B = dict(
    DECODER, timestep_ratio_embedding_dim=8, conditioning_dim=32, block_out_channels=[16, 32, 128],
    down_num_layers_per_block=[1, 2, 1], up_num_layers_per_block=[1, 1, 2], down_blocks_repeat_mappers=[1, 1, 2],
    up_blocks_repeat_mappers=[2, 1, 3], num_attention_heads=[0, 0, 2],
    block_types_per_layer=[[R, T], [R, T], [R, T, A]],
    clip_text_pooled_in_channels=24, clip_seq=2, dropout=[0, 0, 0.1],
)  # fmt: skip


def diffusers_unet(kwargs: dict, seed: int | None = 0):
    """diffusers' StableCascadeUNet: random (seed) or on the meta device (None)."""
    from diffusers import StableCascadeUNet

    if seed is None:
        with torch.device("meta"):
            return StableCascadeUNet(**kwargs)
    torch.manual_seed(seed)
    return randomize(StableCascadeUNet(**kwargs), seed)


def diffusers_config(model) -> dict:
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def to_official(state: dict, stage: str, comfy: bool = False) -> dict:
    """diffusers → the official names: q, k, v stacked into nn.MultiheadAttention's in_proj (or, as
    ComfyUI loads them, kept apart under `attn.`), to_out.0 → attn.out_proj, and Stage B's pooled
    text mapper back to `clip_mapper`."""
    out = {}
    for key, value in state.items():
        attention = re.fullmatch(r"(.*\.attention\.)to_([qkv])\.(weight|bias)", key)
        if attention and comfy:
            out[f"{attention[1]}attn.to_{attention[2]}.{attention[3]}"] = value
        elif attention and attention[2] == "q":
            head, kind = attention[1], attention[3]
            out[f"{head}attn.in_proj_{kind}"] = torch.cat([state[f"{head}to_{x}.{kind}"] for x in "qkv"])
        elif not attention:
            key = key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")
            out[re.sub(r"^clip_txt_pooled_mapper\.", "clip_mapper.", key) if stage == "b" else key] = value
    return out


def assert_same(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs) or sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize("stage, variant", list(HUB))
def test_hub_configs_come_out_of_the_shapes(stage, variant):
    model = diffusers_unet(HUB[stage, variant], seed=None)  # meta: shapes only, no memory
    official = to_official(model.state_dict(), stage[-1])
    found = detect_official_file(official)
    assert (found.kind, found.variant) == (stage, variant)
    config = {k: v for k, v in found.config.items() if not k.startswith("_")}
    assert config == diffusers_config(model)
    assert found.config == HUB_CONFIGS[stage, variant] and found.config["_class_name"] == "StableCascadeUNet"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in found.state.items()} == shapes == unet_shapes(found.config)


@pytest.mark.parametrize("stage, kwargs", [("c", TINY_C), ("b", TINY_B)])
def test_tiny_official_file_converts_exactly(tmp_path, stage, kwargs):
    model = diffusers_unet(kwargs)
    path = tmp_path / f"stage_{stage}.safetensors"
    save_file({k: v.contiguous() for k, v in to_official(model.state_dict(), stage).items()}, path)
    found = load_official_file(path)
    assert (found.kind, found.variant) == (f"stage_{stage}", "custom")
    assert {k: v for k, v in found.config.items() if not k.startswith("_")} == diffusers_config(model)
    assert_same(found.state, model.state_dict())
    convert = convert_stage_c_official if stage == "c" else convert_stage_b_official
    config, state = convert(to_official(model.state_dict(), stage))
    assert config == found.config
    assert_same(state, model.state_dict())
    # The same in ComfyUI's split-attention form, and the reference loads what we made.
    config, state = convert(to_official(model.state_dict(), stage, comfy=True))
    assert_same(state, model.state_dict())
    reference = diffusers_unet({k: v for k, v in config.items() if not k.startswith("_")})
    reference.load_state_dict(state, strict=True)


def test_bf16_files_stay_bf16_unless_asked(tmp_path):
    model = diffusers_unet(TINY_C).to(torch.bfloat16)
    path = tmp_path / "stage_c_bf16.safetensors"
    save_file({k: v.contiguous() for k, v in to_official(model.state_dict(), "c").items()}, path)
    assert_same(load_official_file(path).state, model.state_dict())
    as_float = load_official_file(path, dtype=torch.float32).state
    assert all(v.dtype == torch.float32 for v in as_float.values())
    assert torch.equal(as_float["clf.1.weight"], model.state_dict()["clf.1.weight"].float())


def test_heads_and_patch_size_can_be_given():
    model = diffusers_unet(dict(TINY_B, num_attention_heads=[0, 0, 4]), seed=None)
    official = to_official(model.state_dict(), "b")
    config, _ = convert_stage_b_official(official)
    assert config["num_attention_heads"] == [0, 0, 2]  # 64 channels a head, as every official model
    config, _ = convert_stage_b_official(official, num_attention_heads=[0, 0, 4])
    assert {k: v for k, v in config.items() if not k.startswith("_")} == diffusers_config(model)
    kwargs = dict(TINY_C, patch_size=2, in_channels=4, out_channels=4)
    official = to_official(diffusers_unet(kwargs, seed=None).state_dict(), "c")
    assert convert_stage_c_official(official, patch_size=2)[0]["in_channels"] == 4


def test_mistyped_and_unknown_keys_are_named(tmp_path):
    official = to_official(diffusers_unet(TINY_C, seed=None).state_dict(), "c")
    official["down_blocks.0.0.depthwise.weigth"] = official.pop("down_blocks.0.0.depthwise.weight")
    official["lora.down.weight"] = torch.zeros(1, device="meta")
    with pytest.raises(UserError) as err:
        convert_stage_c_official(official, source="stage_c.safetensors")
    message = str(err.value)
    assert "\n" not in message and message.startswith("stage_c.safetensors: ")
    assert "missing ['down_blocks.0.0.depthwise.weight']" in message
    assert "'down_blocks.0.0.depthwise.weigth'" in message and "'lora.down.weight'" in message
    with pytest.raises(UserError, match="use convert_stage_c_official"):
        convert_stage_b_official(official)


def test_stage_a_is_the_v2_vqgan_with_its_codebook_renamed(tmp_path):
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    vqgan = randomize(PaellaVQModel(**kwargs_of(STAGE_A_PRESETS["tiny"])), 3)
    state = vqgan.state_dict()
    official = {
        ("vquantizer.codebook.weight" if k == "vquantizer.embedding.weight" else k): v for k, v in state.items()
    }
    save_file(official, tmp_path / "stage_a.safetensors")
    found = load_official_file(tmp_path / "stage_a.safetensors")
    assert found.kind == "stage_a" and found.config["scale_factor"] == 0.43
    assert {
        k: v for k, v in found.config.items() if k not in ("_class_name", "_diffusers_version", "scale_factor")
    } == {k: v for k, v in kwargs_of(STAGE_A_PRESETS["tiny"]).items() if k != "scale_factor"}
    assert_same(found.state, state)
    assert_same(found.model().state_dict(), state)


def previewer_keys() -> list[str]:
    """The official Sequential: conv, GELU, BatchNorm2d eight times over, then the RGB conv."""
    keys = []
    for i in range(0, 24, 3):
        keys += [f"blocks.{i}.weight", f"blocks.{i}.bias"]
        keys += [
            f"blocks.{i + 2}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ]
    return keys + ["blocks.24.weight", "blocks.24.bias"]


def test_previewer_round_trip(tmp_path):
    with torch.device("meta"):
        official = Previewer()
    assert list(official.state_dict()) == previewer_keys()
    assert tuple(official.state_dict()["blocks.18.weight"].shape) == (128, 128, 2, 2)
    torch.manual_seed(0)
    model = Previewer(PREVIEWER_PRESETS["tiny"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    save_file(model.state_dict(), tmp_path / "previewer.safetensors")
    found = load_official_file(tmp_path / "previewer.safetensors")
    assert found.kind == "previewer" and found.config["c_hidden"] == 32
    loaded = load_previewer(tmp_path / "previewer.safetensors")
    assert_same(found.model().state_dict(), model.state_dict())
    assert_same(loaded.state_dict(), model.state_dict())
    latents = torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(latents), model.eval()(latents))
        image = loaded.preview(latents)
    assert image.shape == (2, 3, 24, 32) and 0 <= image.min() and image.max() <= 1


def effnet_state(prefix: str = "") -> dict:
    """The effnet's layout (torchvision's features under `backbone.`, a BatchNorm without affine)."""
    return {
        f"{prefix}backbone.0.0.weight": torch.zeros(24, 3, 3, 3),
        f"{prefix}backbone.1.0.block.0.1.num_batches_tracked": torch.zeros((), dtype=torch.long),
        f"{prefix}mapper.0.weight": torch.zeros(16, 1280, 1, 1),
        f"{prefix}mapper.1.running_mean": torch.zeros(16),
    }


def test_effnet_loads_as_the_semantic_compressor(tmp_path):
    """effnet_encoder.safetensors (and ComfyUI's copy, which adds the ImageNet mean/std) is
    SemanticCompressor's "stable-cascade" preset, key for key."""
    from wuerstchen.models.semantic import IMAGENET_MEAN, IMAGENET_STD, SEMANTIC_PRESETS, SemanticCompressor

    assert (detect_official_file(effnet_state()).kind, detect_official_file(effnet_state()).variant) == (
        "effnet",
        "stable-cascade",
    )
    model = SemanticCompressor(SEMANTIC_PRESETS["stable-cascade"]).eval()
    state = model.state_dict()
    save_file(
        state | {"mean": torch.tensor(IMAGENET_MEAN), "std": torch.tensor(IMAGENET_STD)}, tmp_path / "e.safetensors"
    )
    loaded = load_official_file(tmp_path / "e.safetensors").model()
    assert_same(loaded.state_dict(), state)
    save_file(state | {"mean": torch.zeros(3)}, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="not ImageNet's"):
        load_official_file(tmp_path / "bad.safetensors").model()


def test_unknown_file_is_an_error():
    with pytest.raises(UserError, match="not a Stable Cascade file"):
        detect_official_file({"conv_in.weight": torch.zeros(1)})


def clip_towers(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPVisionConfig
    from transformers import CLIPTextModelWithProjection as Text
    from transformers import CLIPVisionModelWithProjection as Vision

    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, projection_dim=16)
    text = Text(CLIPTextConfig(vocab_size=99, max_position_embeddings=77, **small))
    vision = Vision(CLIPVisionConfig(image_size=28, patch_size=14, **small))
    return text.eval(), vision.eval()


def test_comfyui_stage_c_bundle_splits_into_its_parts():
    unet = diffusers_unet(TINY_C)
    text, vision = clip_towers()
    previewer = Previewer(PREVIEWER_PRESETS["tiny"])
    bundle = {f"model.diffusion_model.{k}": v for k, v in to_official(unet.state_dict(), "c", comfy=True).items()}
    bundle |= {f"vae.previewer.{k}": v for k, v in previewer.state_dict().items()}
    bundle |= effnet_state("vae.encoder.") | {"vae.encoder.mean": torch.zeros(3)}  # ComfyUI's StageC_coder
    bundle |= {f"text_encoder.clip_g.transformer.{k}": v for k, v in text.state_dict().items()}
    bundle |= {"text_encoder.clip_g.logit_scale": torch.tensor(4.6055)}
    bundle |= {f"clip_l_vision.{k}": v for k, v in vision.state_dict().items()}
    found = detect_official_file(bundle, "stable_cascade_stage_c.safetensors")
    assert found.kind == "comfyui" and sorted(found.parts) == [
        "effnet",
        "image_encoder",
        "previewer",
        "text_encoder",
        "unet",
    ]
    assert (found.parts["unet"].kind, found.parts["effnet"].kind) == ("stage_c", "effnet")
    assert_same(found.parts["unet"].state, unet.state_dict())
    assert_same(found.parts["previewer"].state, previewer.state_dict())
    assert found.parts["text_encoder"].config == {
        "_class_name": "CLIPTextModelWithProjection",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "projection_dim": 16,
    }
    assert found.parts["image_encoder"].config["_class_name"] == "CLIPVisionModelWithProjection"
    fresh_text, fresh_vision = clip_towers(seed=1)
    fresh_text.load_state_dict(found.parts["text_encoder"].state, strict=True)
    fresh_vision.load_state_dict(found.parts["image_encoder"].state, strict=True)
    assert_same(fresh_text.state_dict(), text.state_dict())
    assert_same(fresh_vision.state_dict(), vision.state_dict())
    with pytest.raises(UserError, match="not ImageNet's"):  # this bundle's effnet has zeros for its mean
        found.parts["effnet"].model()


def test_comfyui_stage_b_bundle_with_stage_a_and_an_older_text_projection():
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    unet = diffusers_unet(TINY_B)
    vqgan = randomize(PaellaVQModel(**kwargs_of(STAGE_A_PRESETS["tiny"])), 4)
    text, _ = clip_towers()
    bundle = {f"model.diffusion_model.{k}": v for k, v in to_official(unet.state_dict(), "b").items()}
    bundle |= {f"vae.{k.replace('embedding', 'codebook')}": v for k, v in vqgan.state_dict().items()}
    text_state = text.state_dict()
    bundle |= {
        f"text_encoder.clip_g.transformer.{k}": v for k, v in text_state.items() if k != "text_projection.weight"
    }
    bundle["text_encoder.clip_g.text_projection"] = text_state["text_projection.weight"].t()  # x @ P
    found = detect_official_file(bundle)
    assert sorted(found.parts) == ["stage_a", "text_encoder", "unet"]
    assert (found.parts["unet"].kind, found.parts["unet"].variant) == ("stage_b", "custom")
    assert_same(found.parts["unet"].state, unet.state_dict())
    assert_same(found.parts["stage_a"].state, vqgan.state_dict())
    assert torch.equal(
        found.parts["text_encoder"].state["text_projection.weight"], text_state["text_projection.weight"]
    )
    bundle["first_stage_model.foo"] = torch.zeros(1)
    with pytest.raises(UserError, match="unknown tensor first_stage_model.foo"):
        detect_official_file(bundle)


def test_our_cascade_unet_loads_a_converted_file(tmp_path):
    pytest.importorskip("wuerstchen.models.cascade")
    model = diffusers_unet(TINY_B)
    path = tmp_path / "stage_b.safetensors"
    save_file({k: v.contiguous() for k, v in to_official(model.state_dict(), "b").items()}, path)
    ours = load_official_file(path).model()
    assert_same(ours.state_dict(), model.state_dict())
