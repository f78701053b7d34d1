"""The benchmark's FLOP counting: torch's counter leaves out the CPU kernel of
`scaled_dot_product_attention`; `wuerstchen bench` counts it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wuerstchen import quant
from wuerstchen.bench import _flop_counter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_is_counted(dtype):
    q, k, v = (
        torch.randn(2, 3, 10, 8, dtype=dtype),
        torch.randn(2, 3, 7, 8, dtype=dtype),
        torch.randn(2, 3, 7, 4, dtype=dtype),
    )
    with _flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 3) * 10 * 7 * (8 + 4)


def test_matmuls_are_still_counted():
    with _flop_counter() as counter:
        torch.randn(5, 6) @ torch.randn(6, 7)
    assert counter.get_total_flops() == 2 * 5 * 6 * 7


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_int8_products_are_counted(kernel, monkeypatch):
    """Both int8 paths of `wuerstchen.quant` count as 2·M·K·N operations, like the float product."""
    if kernel == "fbgemm" and quant.default_kernel() != "fbgemm":
        pytest.skip("this torch has no quantized::linear_dynamic")
    monkeypatch.setattr(quant, "KERNEL", kernel)
    layer = quant.Int8Linear.from_linear(torch.nn.Linear(64, 24), activations=True)
    with torch.no_grad(), _flop_counter() as counter:
        layer(torch.randn(2, 20, 64))
    assert counter.get_total_flops() == 2 * 40 * 64 * 24
