"""The shared building blocks: the fast inference paths (`kernels.inference_kernels()`) against the
reference arithmetic, and the pipeline running them; finite gradients where a channel is all zeros
(as GELU underflow makes in bfloat16); Stage B's semantic condition projected once per generation
against concatenated at every step."""

from __future__ import annotations

import pytest
import torch
from tolerance import BF16_EPS, rel_err

from wuerstchen.models.blocks import GlobalResponseNorm
from wuerstchen.models.kernels import inference_kernels


def _grn(dim: int) -> GlobalResponseNorm:
    grn = GlobalResponseNorm(dim)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    return grn


def test_inference_path_matches_the_training_path():
    grn, x = _grn(8), torch.randn(2, 5, 6, 8)
    with torch.no_grad():
        with inference_kernels():
            fast = grn(x)
        plain = grn(x)
    # The same float32 formula in another order; outputs up to ~8. Measured ≤ 3.3e-7 relative here
    # (500 random draws; AVX2 kernels alike); the former bound, 1e-5 absolute, was ~1.2e-6 relative.
    assert rel_err(fast, plain) <= 1e-6


def test_fast_paths_only_inside_the_block_and_without_autograd(monkeypatch):
    calls = []
    monkeypatch.setattr(GlobalResponseNorm, "_forward_fast", lambda self, x: calls.append(1) or x)
    grn, x = _grn(4), torch.randn(1, 3, 3, 4)
    with torch.no_grad():
        grn(x)
    with inference_kernels():
        grn(x)  # autograd on: the reference
        with torch.no_grad(), inference_kernels(enabled=False):
            grn(x)
        with torch.no_grad():
            grn(x)
    assert len(calls) == 1


def test_the_pipeline_runs_the_fast_paths(tiny_folder, monkeypatch):
    from wuerstchen import WuerstchenPipeline
    from wuerstchen.models.stage_a import MixingResidualBlock

    calls = {"grn": 0, "vqgan": 0}

    def counted(name, fn):
        def run(self, x):
            calls[name] += 1
            return fn(self, x)

        return run

    monkeypatch.setattr(GlobalResponseNorm, "_forward_fast", counted("grn", GlobalResponseNorm._forward_fast))
    monkeypatch.setattr(MixingResidualBlock, "_forward_lean", counted("vqgan", MixingResidualBlock._forward_lean))
    pipe = WuerstchenPipeline.from_pretrained(tiny_folder)
    pipe("a", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, seed=0)
    assert calls["grn"] > 0 and calls["vqgan"] > 0


def test_gradient_is_finite_where_a_channel_is_zero():
    grn, x = _grn(4), torch.randn(1, 3, 3, 4)
    x[..., 0] = 0
    x.requires_grad_(True)
    grn(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(grn.gamma.grad).all()


# float32: rounding, measured 4.3e-7 relative here. bfloat16: each path rounds at other points and
# lies up to ~5 BF16_EPS (of the max) from the float32 output (seeds 0–7, the same with oneDNN's
# emulated bfloat16), so the two are at most ~10 BF16_EPS apart; measured 4.4 BF16_EPS (1.7e-2).
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 10 * BF16_EPS)])
def test_projected_semantic_condition_gives_the_same_noise_estimate(dtype, tol):
    from wuerstchen.models.stage_b import STAGE_B_PRESETS, StageB

    torch.manual_seed(0)
    decoder = StageB(STAGE_B_PRESETS["tiny"]).eval()
    for p in decoder.parameters():  # official init leaves parts at zero; make every path count
        torch.nn.init.normal_(p, std=0.2)
    decoder.to(dtype)
    x, r = torch.randn(2, 4, 16, 16, dtype=dtype), torch.tensor([0.3, 0.8])
    effnet, clip = torch.randn(2, 16, 4, 4, dtype=dtype), torch.randn(2, 5, 32, dtype=dtype)
    with torch.no_grad():
        cond = decoder.condition(effnet, clip, (16, 16))
        decoder.project_effnet = False
        plain_cond = decoder.condition(effnet, clip, (16, 16))
        assert cond.projected and any(p is not None for level in cond.projected for p in level)
        assert not plain_cond.projected
        projected, plain = decoder(x, r, cond=cond).float(), decoder(x, r, cond=plain_cond).float()
    assert rel_err(projected, plain) <= tol


def test_prior_copies_equal_a_repeated_batch():
    """StageC(copies=2) on one copy of x equals the plain pass on torch.cat([x, x]) (CFG's batch)."""
    from wuerstchen.models.stage_c import STAGE_C_PRESETS, StageC

    torch.manual_seed(0)
    prior = StageC(STAGE_C_PRESETS["tiny"]).eval()
    for p in prior.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        # Keep the head's |1 − b| near 1, as in a trained prior: with std-0.2 weights there too, ε is
        # divided by ~0 at some positions, which magnifies rounding to 2e-5 of the max (AVX2 kernels).
        prior.out[1].weight.mul_(0.1)
        prior.out[1].bias.zero_()
    x, r, clip = torch.randn(2, 16, 3, 3), torch.tensor([0.3, 0.8]), torch.randn(4, 5, 32)
    with torch.no_grad():
        kv = prior.condition(clip)
        shared = prior(x, r, kv=kv, copies=2)
        plain = prior(torch.cat([x, x]), torch.cat([r, r]), kv=kv)
    assert shared.shape == plain.shape == (4, 16, 3, 3)
    assert rel_err(shared, plain) <= 1e-6  # other batch shapes, other kernels: measured ≤ 1.7e-7


@pytest.mark.parametrize("shape", [(2, 24, 37, 29), (1, 24, 5, 1), (1, 24, 1, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_vqgan_block_inference_path_matches_the_training_path(shape, channels_last):
    """Stage A's lean inference block (norms in bands of rows, written into its own replicate-padded
    buffer) gives the same numbers as the plain pass, with bands that do not divide the height."""
    from wuerstchen.models.stage_a import MixingResidualBlock

    torch.manual_seed(0)
    block = MixingResidualBlock(24, 96)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    block.band_elements = 96 * shape[0] * shape[3] * 5  # 5 rows a band
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = block(x)
        with inference_kernels():
            lean = block(x)
    assert rel_err(lean, plain) <= 1e-6  # float32 rounding: measured 0 here, 8e-8 with MKL_CBWR=COMPATIBLE


@pytest.mark.parametrize("queries", [50, 600])
def test_cpu_bfloat16_attention_matches_sdpa(queries):
    """`attention` in bfloat16 on a CPU (matmuls and a softmax for few queries, torch's fused kernel
    for many) against the fused kernel in float32."""
    import torch.nn.functional as F

    from wuerstchen.models.blocks import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (queries, 70, 70))
    with torch.no_grad(), inference_kernels():
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # q, k, v and the output rounded to bfloat16 (½ BF16_EPS each), probabilities maybe too: a few
    # BF16_EPS of the max; measured 1.9 BF16_EPS (7.3e-3), the same with emulated bfloat16.
    assert rel_err(out, ref) <= 6 * BF16_EPS


@pytest.mark.parametrize("queries", [50, 200, 600, 5000])
def test_float32_attention_in_bfloat16_only_where_asked(queries):
    """Inside `inference_kernels(bf16_attention=True)` float32 attention with 128–4096 queries runs
    as bfloat16 matmuls (float32 out; 600 queries: three chunks of `BF16_ATTENTION_CHUNK`, the last
    one short); otherwise, and for other query counts, it is torch's fused float32 kernel exactly."""
    import torch.nn.functional as F

    from wuerstchen.models.blocks import BF16_ATTENTION_QUERIES, attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (queries, 70, 70))
    ref = F.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        with inference_kernels():
            assert torch.equal(attention(q, k, v), ref)
        with inference_kernels(bf16_attention=True):
            out = attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    lo, hi = BF16_ATTENTION_QUERIES
    if lo <= queries <= hi:
        # As the bfloat16 case above (q, k, v, scores and probabilities rounded): measured 1.9 BF16_EPS.
        assert 0 < rel_err(out, ref) <= 6 * BF16_EPS
    else:
        assert torch.equal(out, ref)


def test_only_the_int8_pipeline_on_a_bf16_cpu_asks_for_bf16_attention(monkeypatch):
    from wuerstchen import placement
    from wuerstchen.models import kernels

    seen = []
    model = torch.nn.Linear(2, 2)
    for quantization, native in ((None, True), ("int8-weights", True), ("int8", False), ("int8", True)):
        monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda native=native: native)
        model.quantization = quantization
        with torch.no_grad(), placement.Placement().placed("prior", model):
            seen.append(kernels.bf16_attention())
    assert seen == [False, False, False, True]
