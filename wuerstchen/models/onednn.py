"""Inference GEMMs on a CPU through oneDNN with weights packed once (`packed_linears`).

On a CPU `F.linear` runs MKL's sgemm in float32 and oneDNN in bfloat16, and both bring the weight
into their blocked layout again at every call. Inside `packed_linears()` the models' Linear layers
call oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op inductor's weight freezing emits) with
weights packed the first time each is used, and fuse into the GEMM what follows it: the GELU of the
ResBlock MLPs, or the addition of Stage B's precomputed condition term. Outside the block, on other
devices, with autograd on, while compiling, for a handful of rows, or where the op is missing, every
call is plain `F.linear` (`torch.addmm`), so training and the parity with diffusers' classes are
untouched; inside it, float32 results differ from `F.linear`'s by rounding only (~1e-6 relative).

The packed copies live for the `with` block only (the pipeline opens one around each sampling loop of
the stages in its `packed_stages`), so they add at most one model's Linear weights to memory, and
freed, they are handed back to the OS (`malloc_trim`). They are keyed on each weight's
storage and version: a weight replaced or edited in place (`to()`, `load_state_dict`, a LoRA) is
packed again. `wuerstchen bench` measures what this is worth.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_ROWS = 16  # fewer rows (timestep mappers, a single token): the call's overhead outweighs packing
_DTYPES = (torch.float32, torch.bfloat16)
_local = threading.local()  # .cache: {key: (data_ptr, version, packed)} while packing is on


@functools.cache
def available() -> bool:
    """Whether this torch build runs oneDNN linear ops on the CPU (checked once, on a tiny GEMM)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 4), MIN_ROWS)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(MIN_ROWS, 4), w, None, "none", [], "")
        return bool(torch.all(y == 4))
    except (AttributeError, RuntimeError):
        return False


@contextmanager
def packed_linears(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread), our Linear layers run on oneDNN with packed weights."""
    previous = getattr(_local, "cache", None)
    _local.cache = cache = {} if enabled and available() else None
    try:
        yield
    finally:
        _local.cache = previous
        if cache:
            cache.clear()
            _release_freed_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Give the freed packed copies back to the OS: glibc keeps freed blocks of a few MB in its heap,
    where they would stay in the process's resident memory under the next stage's peak."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _packed(weight: Tensor, x: Tensor, part: int | None = None) -> Tensor | None:
    """`weight` (or its first `part` input columns) in oneDNN's layout, or None where the plain
    path applies."""
    cache = getattr(_local, "cache", None)
    if (
        cache is None
        or x.device.type != "cpu"
        or x.dtype not in _DTYPES
        or weight.dtype != x.dtype
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or x.numel() < MIN_ROWS * x.shape[-1]
    ):
        return None
    key = (id(weight), part)
    stamp = (weight.data_ptr(), weight._version)
    entry = cache.get(key)
    if entry is None or entry[0] != stamp:
        w = weight if part is None else weight[:, :part].contiguous()
        rows = x.numel() // x.shape[-1]
        entry = cache[key] = (stamp, torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows))
    return entry[1]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """`F.linear(x, weight, bias)`, followed by an exact (erf) GELU when `gelu`."""
    packed = _packed(weight, x)
    if packed is None:
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def linear_add(x: Tensor, weight: Tensor, other: Tensor) -> Tensor:
    """`x · weight[:, :k]ᵀ + other` for x (..., k): a GEMM over the first k input columns of a wider
    weight, with `other` (the rest of the product and the bias, computed ahead) added."""
    k = x.shape[-1]
    packed = _packed(weight, x, part=k)
    if packed is None:
        y = torch.addmm(other.reshape(-1, other.shape[-1]), x.reshape(-1, k), weight[:, :k].t())
        return y.view(other.shape)
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "add")


class Linear(nn.Linear):
    """`nn.Linear` that runs on oneDNN inside `packed_linears()` (same parameters, same results)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
