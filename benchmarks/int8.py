"""The measurements behind `wuerstchen.quant`: int8 GEMM kernels on this CPU, and the peak memory of
the official-size v2 prior in float32 and int8.

    python benchmarks/int8.py kernels --threads 2
    python benchmarks/int8.py memory --size 1024 --threads 2     # each mode in a fresh process
    python benchmarks/int8.py attention --threads 2

`kernels`: achieved GOP/s at the medium config's shapes (M, K, N) of float32 and bfloat16
`F.linear`, `torch._int_mm` alone, our int8 layer end to end with each kernel (`quant.KERNEL`:
"int_mm" = per-token quantization, the int8 product, the rescaling as separate ops; "fbgemm" = its
fused dynamically quantized Linear), torch.ao's `quantize_dynamic` of the Linear, and oneDNN's int8
Linear (`torch.ops.onednn.qlinear_pointwise`) without and with its fused GELU (against fbgemm +
`F.gelu`). Best of 7 per shape.

`attention`: the attention products (scores and P·V) at the medium config's shapes, per call: torch's
fused float32 kernel, the same as two bfloat16 matmuls with a softmax between them (cast from
float32 and back), those in chunks of 256 queries with q's scale in its cast (`blocks._bf16_attention`,
what the int8 mode runs on a CPU with native bf16 for 128–4096 queries), and
as int8 products per head through `torch._int_mm` (q and k with a scale per row, P with one per
row, v with one per channel; the scores and probabilities as separate float passes). Prints ms per
call, GFLOP/s, and each one's mean relative error against float32.

`memory`: the official v2 prior (`STAGE_C_PRESETS["official-v2"]`, ~1B parameters) with random
weights, built on the meta device and filled in place (int8 modes: int8 layers from the start,
random int8 weights with scales for a std of 1/√fan_in, so no float copy exists), then one CFG
sampling step at `--size` as the pipeline runs it (`Placement.placed`: the float32 prior's Linear
layers packed for oneDNN, as `packed_stages` does; "float32-unpacked": plain `F.linear`, no packed
copy, the least float32 can take). Printed: weights MiB and peak RSS (VmHWM) above the process's
baseline after its imports; the peak of one step is that of all 29 (the activations of a step are
freed before the next).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

SHAPES = ((288, 512, 2048), (288, 2048, 512), (4096, 384, 1536), (4096, 1536, 384))


def _best(fn, repeats: int = 7) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _with_kernel(kernel: str, layer, x):
    from wuerstchen import quant

    saved, quant.KERNEL = quant.KERNEL, kernel
    try:
        return layer(x)
    finally:
        quant.KERNEL = saved


def _onednn_linear(layer, m: int):
    """oneDNN's int8 Linear (`torch.ops.onednn.qlinear_pointwise`, the op inductor's x86 quantization
    emits) on `layer`'s int8 weights, with the activations quantized per tensor to uint8 in torch
    (its int8 activations take a reference path: seconds a call) and an optional post-op ("gelu")."""
    packed = torch.ops.onednn.qlinear_prepack(layer.qweight.t().contiguous(), [m, layer.in_features])
    zeros = torch.zeros(layer.out_features, dtype=torch.long)

    def run(x: torch.Tensor, post: str = "none") -> torch.Tensor:
        lo, hi = torch.aminmax(x)
        scale = ((hi.clamp(min=0) - lo.clamp(max=0)) / 255).clamp_min(1e-12)
        zero = (-lo.clamp(max=0) / scale).round().to(torch.int32)
        qx = torch.div(x, scale).round_().add_(zero).clamp_(0, 255).to(torch.uint8)
        op = torch.ops.onednn.qlinear_pointwise.tensor
        return op(
            qx, scale, zero, packed, layer.weight_scale, zeros, layer.bias, 1.0, 0, torch.float32, post, [], "none"
        )

    return run


def _rates(m: int, k: int, n: int, g: torch.Generator) -> dict[str, float]:
    """GOP/s of each way to multiply (m, k) activations by a (k → n) Linear layer."""
    from wuerstchen.quant import Int8Linear

    linear = torch.nn.Linear(k, n).requires_grad_(False)
    x = torch.randn(m, k, generator=g)
    layer = Int8Linear.from_linear(linear, activations=True)
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    xb, wb = x.bfloat16(), linear.weight.bfloat16()
    with warnings.catch_warnings():  # torch.ao's deprecation notice
        warnings.simplefilter("ignore")
        fbgemm = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear})
    rows = {
        "fp32 F.linear": lambda: F.linear(x, linear.weight, linear.bias),
        "bf16 F.linear": lambda: F.linear(xb, wb),
        "torch._int_mm": lambda: torch._int_mm(q, layer.qweight),
        "Int8Linear int_mm (end to end)": lambda: _with_kernel("int_mm", layer, x),
        "Int8Linear fbgemm (end to end)": lambda: _with_kernel("fbgemm", layer, x),
        "torch.ao quantize_dynamic Linear": lambda: fbgemm(x),
        "Int8Linear fbgemm + F.gelu": lambda: F.gelu(_with_kernel("fbgemm", layer, x)),
    }
    if hasattr(torch.ops.onednn, "qlinear_pointwise"):
        onednn = _onednn_linear(layer, m)
        rows |= {
            "onednn qlinear (end to end)": lambda: onednn(x),
            "onednn qlinear + gelu post-op": lambda: onednn(x, "gelu"),
        }
    with torch.no_grad():
        return {name: 2 * m * k * n / _best(fn) / 1e9 for name, fn in rows.items()}


def kernels() -> None:
    from wuerstchen.bench import print_machine

    print_machine(torch.get_num_threads())
    g = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        rates = _rates(m, k, n, g)
        print(f"{m}×{k}×{n}: " + ", ".join(f"{name} {r:.0f}" for name, r in rates.items()) + " GOP/s", flush=True)


# (batch·CFG, heads, queries, head dim, keys) of the medium config's attention calls at 512²: the
# prior (2 × 8 heads, 144 queries, 144 + 77 keys) and the decoder's levels (1024, 256, 64 queries).
# (batch, heads, queries, d, keys): the medium prior and decoder levels at 512², then at 1024².
ATTENTION_SHAPES = (
    (2, 8, 144, 64, 221), (1, 4, 1024, 48, 1101), (1, 8, 256, 48, 333), (1, 8, 64, 48, 141),
    (2, 8, 576, 64, 653), (1, 4, 4096, 48, 4173), (1, 8, 1024, 48, 1101),
)  # fmt: skip


def _rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.div(x, scale).round_().to(torch.int8), scale


def _int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    qi, sq = _rows_int8(q * q.shape[-1] ** -0.5)
    ki, sk = _rows_int8(k)
    vi, sv = _rows_int8(v.transpose(-1, -2))  # a scale per channel of v
    kt, vk = ki.transpose(-1, -2).contiguous(), vi.transpose(-1, -2).contiguous()
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = torch._int_mm(qi[b, h], kt[b, h]).float().mul_(sq[b, h]).mul_(sk[b, h].view(1, -1))
            p = torch.softmax(scores, -1)
            pi, sp = _rows_int8(p)
            out[b, h] = torch._int_mm(pi, vk[b, h]).float().mul_(sp).mul_(sv[b, h].view(1, -1))
    return out


def attention() -> None:
    from wuerstchen.bench import print_machine

    print_machine(torch.get_num_threads())
    g = torch.Generator().manual_seed(0)

    from wuerstchen.models.blocks import _bf16_attention

    def bf16_matmuls(q, k, v):
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), -1).matmul(v).float()

    for b, h, n, d, m in ATTENTION_SHAPES:
        # q as an AttnBlock has it: the heads of a (B, N, C) projection, a strided view.
        q = torch.randn(b, n, h * d, generator=g).unflatten(-1, (h, d)).transpose(1, 2)
        k, v = (torch.randn(b, h, m, d, generator=g) for _ in range(2))
        ref = F.scaled_dot_product_attention(q, k, v)
        kinds = {"fp32 fused": F.scaled_dot_product_attention, "bf16 matmuls": bf16_matmuls,
                 "bf16 chunked (ours)": _bf16_attention, "int8 _int_mm": _int8_attention}  # fmt: skip
        flops, parts = 4 * b * h * n * m * d, []
        for name, fn in kinds.items():
            seconds = _best(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v))
            error = ((fn(q, k, v) - ref).abs().mean() / ref.abs().mean()).item()
            parts.append(f"{name} {seconds * 1e3:.2f} ms ({flops / seconds / 1e9:.0f} GFLOP/s, {error:.2%})")
        print(f"{b}×{h} heads, {n} queries × {m} keys, d {d}: " + ", ".join(parts), flush=True)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_child(mode: str, size: int) -> None:
    from wuerstchen.models.stage_c import STAGE_C_PRESETS, StageC
    from wuerstchen.placement import Placement
    from wuerstchen.quant import Int8Linear, quantize_model
    from wuerstchen.testing import randomize

    base = _rss_kib("VmRSS:")
    config = STAGE_C_PRESETS["official-v2"]
    with torch.device("meta"):
        prior = StageC(config)
        if not mode.startswith("float32"):
            quantize_model(prior, mode)
    prior = randomize(prior.to_empty(device="cpu"), seed=1)  # the float parameters
    g = torch.Generator().manual_seed(2)
    for layer in prior.modules():  # randomize fills parameters; the int8 layers hold buffers
        if isinstance(layer, Int8Linear):
            layer.qweight.copy_(torch.randint(-127, 128, layer.qweight.shape, dtype=torch.int8, generator=g))
            layer.weight_scale.fill_(math.sqrt(3) / 127 / math.sqrt(layer.in_features))  # uniform ints: std 127/√3
            layer.bias.normal_(0, 0.1, generator=g)
    weights = _rss_kib("VmRSS:")
    side = math.ceil(size / 42.67)
    x = torch.randn(1, config.c_in, side, side, generator=g)
    clip = torch.randn(2, 77, config.c_cond, generator=g)  # [cond; uncond] text states
    t0 = time.perf_counter()
    with torch.no_grad(), Placement().placed("prior", prior, packed=mode != "float32-unpacked") as run:
        eps = run(x, torch.full((1,), 0.5), kv=prior.condition(clip), copies=2)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(eps).all()
    peak = _rss_kib("VmHWM:")
    print(json.dumps({"weights_mib": (weights - base) / 1024, "peak_mib": (peak - base) / 1024, "step_s": seconds}))


def memory(size: int, threads: int) -> None:
    from wuerstchen.bench import print_machine

    print_machine(threads)
    print(f"# official v2 prior (random weights), one CFG step at {size}×{size}, fresh process each")
    results = {}
    for mode in ("float32", "float32-unpacked", "int8-weights", "int8"):
        cmd = [sys.executable, __file__, "memory-child", mode, "--size", str(size), "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
        ratios = " / ".join(f"{r['peak_mib'] / results[m]['peak_mib']:.2f}" for m in results if m.startswith("float"))
        print(f"  {mode:16} weights {r['weights_mib']:7.0f} MiB   peak {r['peak_mib']:7.0f} MiB "
              f"({ratios}× float32's, packed / unpacked)   step {r['step_s']:.1f} s", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("kernels", "attention", "memory", "memory-child"))
    p.add_argument("mode", nargs="?", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "kernels":
        kernels()
    elif args.what == "attention":
        attention()
    elif args.what == "memory":
        memory(args.size, args.threads)
    else:
        memory_child(args.mode, args.size)


if __name__ == "__main__":
    main()
