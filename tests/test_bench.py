"""The benchmark's FLOP counting: torch's counter leaves out the CPU kernel of
`scaled_dot_product_attention`; `wuerstchen bench` counts it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
