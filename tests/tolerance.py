"""Float comparisons whose bounds hold on every CPU the tests run on.

The order of float32 sums in GEMMs and convolutions depends on the CPU's SIMD width and on which
kernel MKL or oneDNN picks (AVX2, AVX-512, AMX; the buffers' alignment), so two computations of the
same value agree up to a few ulps of the terms summed: an error in proportion to the values. An
absolute 1e-4 on a latent of magnitude 23 is 4e-6 of it, about 30 float32 ulps, which one CPU
rounds within and another exceeds. So:

* images in [0, 1]: absolutely, `max_abs`;
* anything else: relative to its scale, `rel_err` (to the reference's max magnitude) or `std_err`
  (to its standard deviation, the parity tests' convention for latents).

bfloat16 keeps 8 significant bits: a rounding is off by up to half of `BF16_EPS` relative. A CPU
without bfloat16 instructions converts to float32 and back, accumulating in another order than the
native dot-product instructions, so bounds on bfloat16 results are stated in units of `BF16_EPS`
from that precision, not from what one CPU happens to give.

To see how a bound fares on other CPUs without one: ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI (oneDNN
emulates bfloat16, as on an Intel Xeon without it; with PYTHONPATH=$PWD/scripts/no_bf16 the
package also sees no bf16 flag, so `auto` picks float32 as there), MKL_ENABLE_INSTRUCTIONS=AVX2 with
ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 (an AVX2 CPU), MKL_CBWR=COMPATIBLE (MKL's
portable code path).
"""

from __future__ import annotations

import math

import torch

BF16_EPS = 2.0**-8  # bfloat16's machine epsilon: the spacing of its values in [1, 2)


def max_abs(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want|: for values of scale ~1, such as images in [0, 1]."""
    return (got.float() - want.float()).abs().max().item()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (0 where both are all zeros, inf where only `want` is)."""
    want = want.float()
    return _ratio((got.float() - want).abs().max().item(), want.abs().max().item())


def std_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / std(want)."""
    want = want.float()
    return _ratio((got.float() - want).abs().max().item(), want.std().item())


def _ratio(err: float, scale: float) -> float:
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
