"""Linear layers on oneDNN with packed weights (`wuerstchen.models.onednn`): the same outputs as
`F.linear` for every stage, weights edited inside the block are packed again, and the plain path
wherever oneDNN must not be used (autograd, a LoRA in place of a Linear)."""

from __future__ import annotations

import pytest
import torch
from tolerance import max_abs, rel_err
from torch import nn

from wuerstchen.models import onednn
from wuerstchen.models.blocks import MLP
from wuerstchen.models.onednn import Linear, linear_add, packed_linears
from wuerstchen.models.stage_a import STAGE_A_PRESETS, StageA
from wuerstchen.models.stage_b import STAGE_B_PRESETS, StageB
from wuerstchen.models.stage_c import STAGE_C_PRESETS, StageC

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear ops")


def _random(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():  # official init leaves parts at zero; make every path count
        nn.init.normal_(p, std=0.2)
    return model.eval().to(dtype)


def _stages(dtype: torch.dtype):
    """(name, call) per stage: tiny random weights and inputs, all in `dtype`."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    r = torch.tensor([0.3, 0.8])
    prior = _random(StageC(STAGE_C_PRESETS["tiny"]), dtype)
    with torch.no_grad():
        # Keep the head's |1 − b| near 1, as in a trained prior: with std-0.2 weights there too, ε is
        # divided by ~0 at some positions (outputs in the hundreds) and any two bfloat16 runs differ
        # by 20–30% of the mean, so their errors could not be compared.
        prior.out[1].weight.mul_(0.1)
        prior.out[1].bias.zero_()
    x, text = randn(2, 16, 4, 4), randn(4, 5, 32)
    yield "prior", lambda: prior(x, r, text, copies=2)
    decoder = _random(StageB(STAGE_B_PRESETS["tiny"]), dtype)
    latent, effnet, clip = randn(2, 4, 16, 16), randn(2, 16, 4, 4), randn(2, 5, 32)
    yield "decoder", lambda: decoder(latent, r, effnet, clip)
    vqgan = _random(StageA(STAGE_A_PRESETS["tiny"]), dtype)
    vq_latent = randn(1, 4, 16, 16)
    yield "vqgan", lambda: vqgan.decode_latents(vq_latent)


def test_every_stage_gives_the_same_output_on_onednn():
    """float32: the same output up to rounding; bfloat16: no further from the float32 output than
    plain bfloat16 is (the fused GELU is computed before rounding, so it may be nearer)."""
    exact = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, run in _stages(dtype):
            with torch.no_grad():
                plain = run().float()
                with packed_linears():
                    fast = run().float()
                    assert onednn._local.cache, f"{name}: no Linear went through oneDNN"
            assert onednn._local.cache is None  # the packed copies are gone after the block
            if dtype == torch.float32:
                exact[name] = plain
                err = rel_err(fast, plain)  # other GEMM kernels: measured ≤ 1.2e-7 (4.5e-7 with MKL_CBWR=COMPATIBLE)
                assert err <= 1e-5, f"{name}: {err}"
            else:
                ref = exact[name]
                # Both in bfloat16 on this CPU, natively or emulated alike (measured the same either
                # way): plain bfloat16 is 0.7–2.3 BF16_EPS of the mean off float32 here, oneDNN's
                # 0.98–1.01 times that; 1e-3 (a quarter of BF16_EPS) covers a near-exact plain_err.
                err, plain_err = (fast - ref).abs().mean(), (plain - ref).abs().mean()
                assert err <= 1.25 * plain_err + 1e-3 * ref.abs().mean(), f"{name}: {err} vs {plain_err}"


def test_fused_gelu_and_added_term_match_the_plain_ops():
    torch.manual_seed(0)
    mlp = MLP(Linear(12, 48), nn.GELU(), nn.Linear(48, 12))
    x, w, other = torch.randn(2, 4, 5, 12), torch.randn(48, 20), torch.randn(2, 4, 5, 48)
    with torch.no_grad():
        plain_mlp, plain_add = mlp(x), torch.addmm(other.view(-1, 48), x.view(-1, 12), w[:, :12].t()).view(2, 4, 5, 48)
        with packed_linears():
            fused_mlp, fused_add = mlp(x), linear_add(x, w, other)
    # float32 rounding (GELU fused into oneDNN's GEMM): measured 0 here, ≤ 1.4e-7 with MKL_CBWR=COMPATIBLE.
    assert rel_err(fused_mlp, plain_mlp) <= 1e-5
    assert rel_err(fused_add, plain_add) <= 1e-5


def test_a_weight_edited_inside_the_block_is_packed_again():
    torch.manual_seed(0)
    layer, x = Linear(8, 8), torch.randn(32, 8)
    with torch.no_grad(), packed_linears():
        before = layer(x)
        layer.weight.mul_(2)  # in place: same storage, new version
        after = layer(x)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert not torch.allclose(before, after)
    assert rel_err(after, expected) <= 1e-5  # float32 rounding: measured 6.5e-8


def test_training_and_wrapped_layers_take_the_plain_path():
    torch.manual_seed(0)
    mlp, x = MLP(Linear(8, 32), nn.GELU(), Linear(32, 8)), torch.randn(32, 8)
    with packed_linears():
        mlp(x).sum().backward()  # autograd on: never oneDNN
        assert not onednn._local.cache
    assert mlp[0].weight.grad is not None

    class Doubled(nn.Module):  # stands for a LoRA wrapper around the first Linear
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base = base

        def forward(self, t):
            return 2 * self.base(t)

    with torch.no_grad():
        expected = mlp[2](torch.nn.functional.gelu(2 * mlp[0](x)))
        mlp[0] = Doubled(mlp[0])
        with packed_linears():
            got = mlp(x)
    assert rel_err(got, expected) <= 1e-5  # float32 rounding: measured ≤ 2.1e-7


def test_pipeline_on_onednn_changes_no_pixel():
    from wuerstchen.testing import random_pipeline

    pipe = random_pipeline("tiny", seed=0)
    images = {}
    for packed in ((), ("prior", "decoder", "vqgan")):
        pipe.packed_stages = packed
        images[bool(packed)] = pipe("a red circle", height=128, width=128, output_type="pt", seed=3).images
    assert max_abs(images[True], images[False]) <= 1e-5  # images in [0, 1]: measured ≤ 1.8e-7
