"""The shared building blocks: the fast inference path of GlobalResponseNorm against the training
path, and finite gradients where a channel is all zeros (as GELU underflow makes in bfloat16)."""

from __future__ import annotations

import torch

from wuerstchen.models.blocks import GlobalResponseNorm


def _grn(dim: int) -> GlobalResponseNorm:
    grn = GlobalResponseNorm(dim)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    return grn


def test_inference_path_matches_the_training_path():
    grn, x = _grn(8), torch.randn(2, 5, 6, 8)
    with torch.no_grad():
        fast = grn(x)
    assert (fast - grn(x)).abs().max() <= 1e-5


def test_gradient_is_finite_where_a_channel_is_zero():
    grn, x = _grn(4), torch.randn(1, 3, 3, 4)
    x[..., 0] = 0
    x.requires_grad_(True)
    grn(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(grn.gamma.grad).all()
