"""The semantic compressor: official key layout and size, shapes, checkpoints, BatchNorm modes.

Run: pytest -q tests/test_semantic.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerance import rel_err

from wuerstchen.models.config import config_from_dict, config_to_dict
from wuerstchen.models.semantic import SEMANTIC_PRESETS, SemanticCompressor, SemanticConfig

# efficientnet_v2_s().features state_dict with a `backbone.` prefix, then the v2 mapper: one
# "key dim dim ..." per line. Written from torchvision's stage table and checked by hand against a
# published efficientnet_v2_s parameter table, not generated from our model.
KEYS_FILE = Path(__file__).parent / "data" / "effnetv2s_keys.txt"

# torchvision's EfficientNet_V2_S_Weights meta: 21,458,488 parameters, of which the classifier
# Linear(1280 → 1000) holds 1,281,000; the features are the rest.
V2S_FEATURE_PARAMS = 21_458_488 - 1_281_000  # 20,177,488
MAPPER_PARAMS = 1280 * 16 + 2 * 16  # conv without bias + BatchNorm affine


def expected_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in KEYS_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, *dims = line.split()
            rows.append((name, tuple(int(d) for d in dims)))
    return rows


def tiny(seed: int = 0) -> SemanticCompressor:
    """The tiny model with random BatchNorm statistics and affines, so that nothing is trivial."""
    torch.manual_seed(seed)
    model = SemanticCompressor(SEMANTIC_PRESETS["tiny"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
    return model.eval()


def test_official_v2_has_torchvision_keys_shapes_and_size() -> None:
    with torch.device("meta"):
        model = SemanticCompressor(SEMANTIC_PRESETS["official-v2"])
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    want = expected_keys()
    assert len(want) == 786  # 780 trunk tensors (450 parameters + 110 BatchNorms × 3 buffers) + 6
    assert got == want
    trunk = sum(p.numel() for p in model.backbone.parameters())
    assert trunk == V2S_FEATURE_PARAMS == 20_177_488
    assert sum(p.numel() for p in model.parameters()) == V2S_FEATURE_PARAMS + MAPPER_PARAMS
    # BatchNorm eps: 1e-3 in the trunk (torchvision's V2), PyTorch's default in the mapper.
    assert {m.eps for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    assert model.mapper[1].eps == 1e-5


def test_official_v2_stride_on_meta() -> None:
    """768 px → 24 × 24 on the full architecture, shape-only (meta tensors compute nothing)."""
    with torch.device("meta"):
        model = SemanticCompressor(SEMANTIC_PRESETS["official-v2"]).eval()
        out = model(torch.empty(2, 3, 768, 640))
    assert model.config.stride == 32
    assert out.shape == (2, 16, 24, 20)


def test_stable_cascade_preset_has_no_mapper_affine() -> None:
    with torch.device("meta"):
        model = SemanticCompressor(SEMANTIC_PRESETS["stable-cascade"])
    want = [k for k, _ in expected_keys() if k not in ("mapper.1.weight", "mapper.1.bias")]
    assert list(model.state_dict()) == want


def test_tiny_shape_and_stride() -> None:
    model = tiny()
    cfg = model.config
    assert cfg.stride == 32
    assert sum(p.numel() for p in model.parameters()) < 100_000
    with torch.no_grad():
        assert model(torch.rand(2, 3, 768, 768)).shape == (2, 16, 24, 24)
        assert model(torch.rand(1, 3, 96, 160)).shape == (1, 16, 3, 5)
        # Sides that are not multiples of 32 round up (every stride-2 conv pads by k // 2).
        assert model(torch.rand(1, 3, 100, 33)).shape == (1, 16, 4, 2)


def test_encode_resizes_to_the_latent_side() -> None:
    model = tiny()
    cfg = model.config
    assert cfg.latent_size(1024) == 24 and cfg.input_size(24) == 768  # the v2 pipeline's sizes
    images = torch.rand(1, 3, 256, 384)
    before = images.clone()
    with torch.no_grad():
        # ⌈256 / 42.67⌉ = 6, ⌈384 / 42.67⌉ = 9: the trunk sees 192 × 288 px.
        assert model.encode(images).shape == (1, 16, 6, 9)
        assert model.encode(images, size=4).shape == (1, 16, 4, 4)
        assert model.encode(images, size=(2, 3)).shape == (1, 16, 2, 3)
        # Already at the input size: no resize, the same as calling the model.
        exact = torch.rand(1, 3, 64, 96)
        assert torch.equal(model.encode(exact, size=(2, 3)), model(exact))
    assert torch.equal(images, before)
    # bfloat16 works too (the resize runs in float32: CPU has no bfloat16 antialias kernel).
    with torch.no_grad():
        out = model.to(torch.bfloat16).encode(torch.rand(1, 3, 100, 100, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 16, 3, 3)


def test_normalisation_is_inside() -> None:
    """An image equal to the ImageNet mean reaches the trunk as zeros."""
    model = tiny()
    seen = {}
    model.backbone.register_forward_pre_hook(lambda _, args: seen.setdefault("x", args[0]))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    with torch.no_grad():
        model(mean)
    assert seen["x"].abs().max() < 1e-6


def test_safetensors_round_trip_into_meta_model(tmp_path: Path) -> None:
    model = tiny()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(model.config, model.diffusers_class)))

    config = config_from_dict(SemanticConfig, json.loads((tmp_path / "config.json").read_text()))
    assert config == model.config
    with torch.device("meta"):
        loaded = SemanticCompressor(config)
    loaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True, assign=True)
    loaded.eval()
    assert_same_model(loaded, model)


def assert_same_model(loaded: SemanticCompressor, model: SemanticCompressor) -> None:
    """Every tensor bit-identical; outputs equal up to float32 rounding, because tensors memory-mapped
    from safetensors may be only 8-byte aligned, which changes the CPU kernels' SIMD summation order
    (measured: ≤ 4e-8 apart, of outputs up to ~0.5; bit-identical once the tensors are cloned)."""
    want = model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    x = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        out, ref = loaded(x), model(x)
    # Relative to the outputs' max (~0.5; the former atol 1e-6 was 2e-6 of it): measured ≤ 1.3e-7.
    assert out.shape == ref.shape and rel_err(out, ref) <= 2e-6


def test_project_checkpoint_folder_round_trip(tmp_path: Path) -> None:
    """The shared loader (config.json + safetensors, meta build, strict assign) takes this model."""
    from wuerstchen.io.checkpoint import load_model, save_model

    model = tiny()
    save_model(model, tmp_path)
    loaded = load_model(SemanticCompressor, tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert_same_model(loaded, model)


def test_eval_is_deterministic_and_ignores_stochastic_depth() -> None:
    model = tiny()
    assert any(m.residual and m.drop > 0 for m in model.modules() if hasattr(m, "residual"))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()


def test_train_mode_updates_batchnorm_stats_and_backprops() -> None:
    model = tiny().train()
    bn = model.mapper[1]
    mean_before = bn.running_mean.clone()
    trunk_bn = model.backbone[0][1]
    var_before = trunk_bn.running_var.clone()
    out = model(torch.rand(4, 3, 64, 64))
    assert bn.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, mean_before)
    assert not torch.equal(trunk_bn.running_var, var_before)
    # In train mode the mapper's BatchNorm normalises with batch statistics: mean 0 per channel.
    assert out.mean(dim=(0, 2, 3)).sub(bn.bias).abs().max() < 1e-4
    out.square().mean().backward()
    assert model.backbone[0][0].weight.grad is not None


@pytest.mark.parametrize("name", sorted(SEMANTIC_PRESETS))
def test_presets_stride_and_input_scale(name: str) -> None:
    # The official-style presets: stride 32, the trunk sees 0.75 of the image side (1024 → 768 px →
    # 24); the shipped small model's: stride 16, the image at its own size (128 → 8).
    cfg = SEMANTIC_PRESETS[name]
    stride, scale, side = (16, 1.0, 128) if name == "small" else (32, 0.75, 1024)
    assert cfg.stride == stride
    assert math.isclose(cfg.input_size(cfg.latent_size(side)) / side, scale)
