"""Int8 inference (`wuerstchen.quant`): the int8 layers against float, quantized tiny v2 and v3
pipelines, save and reload, and the user's mistakes.

    pytest tests/test_quant.py
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.tolerance import rel_err
from wuerstchen import WuerstchenPipeline, quant
from wuerstchen.errors import UserError
from wuerstchen.quant import Int8Linear, quantize_model, quantize_rows
from wuerstchen.shapes.evaluate import psnr
from wuerstchen.testing import random_cascade_pipeline, random_pipeline


def _linear(k: int, n: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n).requires_grad_(False)


@pytest.fixture(params=["fbgemm", "int_mm"])
def kernel(request, monkeypatch) -> str:
    """Each int8 product path (`quant.KERNEL`); fbgemm where this torch has it."""
    if request.param == "fbgemm" and quant.default_kernel() != "fbgemm":
        pytest.skip("this torch has no quantized::linear_dynamic")
    monkeypatch.setattr(quant, "KERNEL", request.param)
    return request.param


@torch.no_grad()
def test_int8_linear_is_the_float_product_within_int8_rounding(kernel: str) -> None:
    lin = _linear(192, 96)
    x = torch.randn(4, 64, 192, generator=torch.Generator().manual_seed(1))
    want = lin(x)
    got = Int8Linear.from_linear(lin, activations=True)(x)
    # Each factor is rounded to a step of max|·|/127 (per output channel; per token, or (max − min)/255
    # per tensor): uniform noise of std step/√12 ≈ 0.9% of a Gaussian's std where max ≈ 3.5σ (per
    # tensor max ≈ 4.5σ over 49k values: about the same step), so ~1.3% for the product of both; the
    # bound is max |Δ| / max |y| over 24k outputs, ~4σ of that noise relative to max |y| ≈ 4σ_y.
    assert rel_err(got, want) <= 0.03  # measured 0.0088 (int_mm), 0.0083 (fbgemm)
    weights_only = Int8Linear.from_linear(lin, activations=False)(x)
    assert rel_err(weights_only, want) <= 0.02  # the weights' rounding alone; measured 0.0039
    # The int8 path is the exact integer product of the rounded factors, rescaled in float32.
    layer = Int8Linear.from_linear(lin, activations=True)
    if kernel == "int_mm":
        q, s = quantize_rows(x.reshape(-1, 192))
        rounded = q.double() * s.double()
    else:  # fbgemm rounds the whole tensor to 8 bits (7 without VNNI) with a zero point
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notice of quantized tensors
            rounded = torch.quantize_per_tensor_dynamic(x.reshape(-1, 192), torch.quint8, quant.REDUCE_RANGE)
        rounded = rounded.dequantize().double()
    exact = rounded @ layer.dequantized(torch.float64) + lin.bias.double()
    assert rel_err(got.reshape(-1, 96), exact) <= 1e-6  # float32 rescaling of an exact int32 sum


@torch.no_grad()
def test_int8_linear_follows_new_weights(kernel: str) -> None:
    """fbgemm's packed weight is made at the first call: weights changed in place or replaced after
    it (a LoRA merge, `load_state_dict`) are used at the next call, as a fresh layer would."""
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    layer = Int8Linear.from_linear(_linear(48, 32), activations=True)
    layer(x)
    other = Int8Linear.from_linear(_linear(48, 32, seed=1), activations=True)
    layer.qweight.copy_(other.qweight)  # in place: the same storage, a new version
    layer.weight_scale.copy_(other.weight_scale)
    layer.bias = other.bias.clone()  # replaced: another tensor
    assert torch.equal(layer(x), other(x))
    layer.load_state_dict(Int8Linear.from_linear(_linear(48, 32, seed=2), activations=True).state_dict())
    assert torch.equal(layer(x), Int8Linear.from_linear(_linear(48, 32, seed=2), activations=True)(x))


@torch.no_grad()
def test_int8_linear_parts_and_casts(kernel: str) -> None:
    """`linear_add` + `columns` (Stage B's precomputed skip) give the whole product; `to(bfloat16)`
    keeps the scales in float32; few rows take the dequantized path."""
    lin = _linear(48, 32, seed=2)
    h, skip = torch.randn(2, 40, 32), torch.randn(2, 40, 16)
    for activations in (False, True):
        layer = Int8Linear.from_linear(lin, activations)
        projected = torch.nn.functional.linear(skip, layer.columns(32, torch.float32), layer.bias)
        whole = layer(torch.cat([h, skip], dim=-1))
        # Weight-only: the same float products summed apart (fp32 rounding). int8: h's tokens get their
        # own scale (no longer shared with skip's channels): int8 rounding, as above. Measured 1.6e-7, 0.0059.
        assert rel_err(layer.linear_add(h, projected), whole) <= (1e-5 if not activations else 0.03)
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    with torch.device("meta"):  # built on the meta device, then given storage (as big models are)
        empty = Int8Linear(48, 32, True, activations).to_empty(device="cpu")
    assert empty.weight_scale.device.type == "cpu" and empty.weight_scale.dtype == torch.float32
    assert layer(torch.randn(3, 48, dtype=torch.bfloat16)).dtype == torch.bfloat16


@torch.no_grad()
def test_fused_int8_projections_are_the_separate_ones(kernel: str) -> None:
    """`Int8Linear.fused` (an attention's q, k, v in one fbgemm product) gives each layer's own
    output, follows new weights, and an AttnBlock of int8 layers computes what it computes with
    one call per projection."""
    from wuerstchen.models import blocks

    layers = [Int8Linear.from_linear(_linear(64, 64, seed=i), activations=True) for i in range(3)]
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(4))
    for changed in (None, 0, 2):  # then with the first layer's weights changed in place, then another's
        if changed is not None:
            layers[changed].qweight.copy_(layers[1].qweight)
        for got, layer in zip(layers[0].fused(x, *layers[1:]), layers, strict=True):
            # The same quantized input (one scale per call, from the same x) and the same exact int32
            # sums; only the float32 rescaling can round apart: ≤ a few float32 ulps.
            assert got.shape == (2, 40, 64) and rel_err(got, layer(x)) <= 1e-6
    torch.manual_seed(5)
    block = blocks.AttnBlock(64, 32, nhead=4).eval()
    quantize_model(block, "int8")
    x, cond = torch.randn(2, 64, 6, 6), torch.randn(2, 7, 32)
    kv, attn, text = block.text_kv(cond), block.attention, block.kv_mapper(cond)
    for got, layer in zip(kv, (attn.to_k, attn.to_v), strict=True):  # the text's k, v through the q, k, v product
        assert rel_err(got, attn.heads(layer(text))) <= 1e-6  # as above
    fused = block(x, kv)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(blocks, "_projections", lambda x, *layers: [layer(x) for layer in layers])
        separate = block(x, kv)
    assert rel_err(fused, separate) <= 1e-6  # as above


def _generate(pipe: WuerstchenPipeline, size: int) -> torch.Tensor:
    return pipe(["a red circle", "a blue square"], height=size, width=size, seed=0, output_type="pt",
                prior_num_inference_steps=4, num_inference_steps=4).images  # fmt: skip


@pytest.mark.parametrize("generation", ["v2", "v3"])
def test_quantized_tiny_pipelines_stay_close(generation: str) -> None:
    base = random_pipeline("tiny", seed=0) if generation == "v2" else random_cascade_pipeline("tiny", seed=0)
    size = 128 if generation == "v2" else 256
    want = _generate(base, size)
    for mode in ("int8", "int8-weights"):
        pipe = copy.deepcopy(base).quantize(mode)
        layers = [m for m in (pipe.prior, pipe.decoder, pipe.vqgan) for m in m.modules() if isinstance(m, Int8Linear)]
        assert layers and all(m.activations == (mode == "int8") for m in layers)
        kept = [n for n, m in pipe.prior.named_modules() if type(m) is not Int8Linear and isinstance(m, nn.Linear)]
        if mode == "int8":  # timestep and condition mappers stay float
            assert kept and all("mapper" in n for n in kept)
        else:  # every Linear in int8: memory is the point
            assert not kept
        got = _generate(pipe, size)
        assert torch.isfinite(got).all()
        # The bar for int8 images (≥ 30 dB against float32); measured 47–55 dB here.
        values = [psnr(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()) for a, b in zip(got, want, strict=True)]
        assert min(values) >= 30, (mode, values)


def test_saved_quantized_pipeline_reloads_identically(tmp_path) -> None:
    pipe = random_pipeline("tiny", seed=3).quantize("int8")
    pipe.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "decoder" / "config.json").read_text())
    assert config["_quantization"] == "int8"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "prior_prior" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["blocks.0.channelwise.0.qweight"] == "I8" and dtypes["blocks.0.channelwise.0.weight_scale"] == "F32"
    again = WuerstchenPipeline.from_pretrained(tmp_path / "q")
    assert torch.equal(_generate(again, 128), _generate(pipe, 128))
    # The same int8 tensors serve the other mode too: the mode only changes the forward.
    weights_only = WuerstchenPipeline.from_pretrained(tmp_path / "q", quantize="int8-weights")
    assert not any(m.activations for m in weights_only.decoder.modules() if isinstance(m, Int8Linear))


def test_bad_quantize_values_are_one_line_errors(tiny_folder, tmp_path) -> None:
    for bad in ("int4", "INT8", True):
        with pytest.raises(UserError, match=r"^quantize=.*use one of int8, int8-weights[^\n]*$"):
            WuerstchenPipeline.from_pretrained(tiny_folder, quantize=bad)
    with pytest.raises(UserError, match="^quantize='fp8'"):
        random_pipeline("tiny").quantize("fp8")
    with pytest.raises(UserError, match=r"^quantize='int8' \(int8 activations\) runs on the CPU only, not cuda"):
        WuerstchenPipeline.from_pretrained(tiny_folder, quantize="int8", device="cuda")
    model = quantize_model(copy.deepcopy(random_pipeline("tiny").decoder), "int8")
    from wuerstchen.io.checkpoint import load_model, save_model

    save_model(model, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "_quantization": "int3"}))
    with pytest.raises(UserError, match="unknown _quantization 'int3'"):
        load_model(type(model), tmp_path / "d")


def test_the_quantize_flag(tiny_folder) -> None:
    from wuerstchen.cli import build_parser
    from wuerstchen.commands.common import load_from_args

    parser = build_parser()
    for argv in (["generate", "x"], ["serve"], ["eval"], ["bench"]):
        assert parser.parse_args([*argv, "--quantize", "int8-weights"]).quantize == "int8-weights"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["generate", "x", "--quantize", "int4"])
    assert e.value.code == 2
    argv = ["generate", "x", "--model", str(tiny_folder), "--quantize", "int8", "--dtype", "float32", "--device", "cpu"]
    args = parser.parse_args(argv)
    pipe = load_from_args(args)
    assert all(m.activations for m in pipe.prior.modules() if isinstance(m, Int8Linear))
    image = np.asarray(pipe("x", seed=0, prior_num_inference_steps=2, num_inference_steps=2).images[0])
    assert image.shape == (128, 128, 3) and image.std() > 0


def test_int8_products_are_counted_by_the_benchmark() -> None:
    from wuerstchen.bench import _flop_counter

    a, b = torch.ones(5, 6, dtype=torch.int8), torch.ones(6, 7, dtype=torch.int8)
    with _flop_counter() as counter:
        torch._int_mm(a, b)
    assert counter.get_total_flops() == 2 * 5 * 6 * 7
