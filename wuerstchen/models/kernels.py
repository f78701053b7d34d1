"""Inference kernels: faster arithmetic for the same function, switched on by name.

Each model's `forward` is the reference arithmetic: what training differentiates and what diffusers'
classes compute. Inside `inference_kernels()` (this thread, autograd off) these blocks take a faster
path instead, which the tests check against the reference (tests/test_blocks.py):

- `GlobalResponseNorm`: ‖x‖ over H, W as √Σx², and the tail as one pass over x;
- `attention`: in bfloat16 on a CPU, for few queries, two matmuls and a softmax instead of torch's
  fused kernel; with `bf16_attention=True` (the int8 pipeline on a CPU with native bf16) float32
  attention is computed so too, in bfloat16;
- the VQGAN's `MixingResidualBlock`: the same block in bands of rows, with fewer full-size tensors
  alive (the decoder's peak memory).

The pipeline switches them on around every model it runs (`Placement.placed`), together with the
CPU's packed Linear layers (`onednn.packed_linears`).

    with inference_kernels(), torch.no_grad():
        image = vqgan.decode(latents)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_local = threading.local()  # .on: whether the block of this thread is inside inference_kernels()


@contextmanager
def inference_kernels(enabled: bool = True, bf16_attention: bool = False) -> Iterator[None]:
    """Within the block (this thread, without autograd), the models' fast inference paths run;
    `bf16_attention`: float32 attention products in bfloat16 too (see `blocks.attention`)."""
    previous = getattr(_local, "on", False), getattr(_local, "bf16_attention", False)
    _local.on, _local.bf16_attention = enabled, enabled and bf16_attention
    try:
        yield
    finally:
        _local.on, _local.bf16_attention = previous


def active() -> bool:
    """Whether a block should take its fast path now: inside `inference_kernels()` and without
    autograd (the fast paths are not differentiable as the reference is: GRN's √Σx² has an infinite
    gradient at an all-zero channel, the banded VQGAN block writes in place)."""
    return getattr(_local, "on", False) and not torch.is_grad_enabled()


def bf16_attention() -> bool:
    """Whether float32 attention may run in bfloat16 now (inside `inference_kernels(bf16_attention=True)`)."""
    return active() and getattr(_local, "bf16_attention", False)
