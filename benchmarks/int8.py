"""The measurements behind `wuerstchen.quant`: int8 GEMM kernels on this CPU, and the peak memory of
the official-size v2 prior in float32 and int8.

    python benchmarks/int8.py kernels --threads 2
    python benchmarks/int8.py memory --size 1024 --threads 2     # each mode in a fresh process
    python benchmarks/int8.py attention --threads 2
    python benchmarks/int8.py ceiling --threads 2      # the pipeline with its int8 products free
    python benchmarks/int8.py compiled --threads 2     # inductor around fbgemm's int8 products

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

`ceiling` and `compiled`: the medium int8 pipeline at 512² (prior 29 steps CFG 4, decoder 12),
alternating in one process: as it runs against every int8 product replaced by a stored output of its
shape (what all else costs: the bound on what faster int8 products could give); eager against
`torch.compile` of prior and decoder with the int8 products as opaque custom ops. Seconds per run.

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
    emits) on `layer`'s int8 weights, with the activations quantized per tensor to uint8 by torch's
    one-op `quantize_per_tensor_dynamic` (as fbgemm's dynamic Linear does inside; oneDNN's int8
    activations take a reference path: seconds a call) and an optional post-op ("gelu")."""
    packed = torch.ops.onednn.qlinear_prepack(layer.qweight.t().contiguous(), [m, layer.in_features])
    zeros = torch.zeros(layer.out_features, dtype=torch.long)

    def run(x: torch.Tensor, post: str = "none") -> torch.Tensor:
        with warnings.catch_warnings():  # torch's notice that quantized tensors are deprecated
            warnings.simplefilter("ignore")
            qx = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
            u8, scale, zero = qx.int_repr(), qx.q_scale(), qx.q_zero_point()
        op, w_scale = torch.ops.onednn.qlinear_pointwise, layer.weight_scale
        return op(u8, scale, zero, packed, w_scale, zeros, layer.bias, 1.0, 0, torch.float32, post, [], "none")

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
# prior (2 × 8 heads, 144 queries, 144 + 77 keys) and the decoder's levels (1024, 256, 64 queries);
# then at 1024² (the prior's 576 queries, the decoder's 4096 and 1024).
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


def _medium_int8_runners():
    from wuerstchen.bench import stage_runners
    from wuerstchen.sampling import DEFAULT_STAGE_C_TIMESTEPS
    from wuerstchen.testing import random_pipeline

    pipe = random_pipeline("medium")
    pipe.quantize("int8")
    return pipe, stage_runners("ours", pipe, 512, DEFAULT_STAGE_C_TIMESTEPS, 12)


def _alternate(runners, variants: dict, pairs: int) -> None:
    """Run the pipeline under each variant (a context manager factory) in turn, `pairs` times
    (the order flipped every round), after one untimed run each; print each run's stage seconds."""
    from wuerstchen.bench import run_once

    for make in variants.values():
        with make():
            run_once(runners)
    times = {name: [] for name in variants}
    for i in range(pairs):
        for name in list(variants)[:: 1 if i % 2 == 0 else -1]:
            with variants[name]():
                times[name].append(run_once(runners)[0])
    for name, runs in times.items():
        totals = sorted(sum(t) for t in runs)
        stages = " ".join("/".join(f"{t[j]:.2f}" for t in runs) for j in range(3))
        print(f"  {name:24} total median {totals[len(totals) // 2]:.2f} s, min {totals[0]:.2f} s;"
              f" prior, decoder, VQGAN per run: {stages}", flush=True)  # fmt: skip


def ceiling(pairs: int) -> None:
    """The medium int8 pipeline at 512² as it runs, and with every int8 product replaced by a stored
    output of its shape (no arithmetic, no quantization): what everything but the int8 Linear
    layers costs. Alternating in one process."""
    from contextlib import contextmanager, nullcontext

    from wuerstchen import quant
    from wuerstchen.bench import print_machine

    print_machine(torch.get_num_threads())
    pipe, runners = _medium_int8_runners()
    stored: dict[tuple, torch.Tensor] = {}
    product, fused = quant.Int8Linear._product, quant.Int8Linear.fused

    def free_product(layer, x, other):
        if not layer._int8_path(x):
            return product(layer, x, other)
        key = (*x.shape[:-1], layer.out_features)
        if key not in stored:  # values of an activation's scale (no zeros, no denormals)
            stored[key] = torch.randn(key, generator=torch.Generator().manual_seed(0)) * 0.5
        return stored[key]

    @contextmanager
    def free():
        quant.Int8Linear._product = free_product
        quant.Int8Linear.fused = lambda layer, x, *others: [free_product(m, x, None) for m in (layer, *others)]
        try:
            yield
        finally:
            quant.Int8Linear._product, quant.Int8Linear.fused = product, fused

    print("# medium config int8, 512², prior 29 steps CFG 4, decoder 12; int8 products as they are / free")
    _alternate(runners, {"int8": nullcontext, "int8, products free": free}, pairs)


def compiled(pairs: int) -> None:
    """The medium int8 pipeline's prior and decoder through `torch.compile` (inductor, no freezing)
    with each int8 product an opaque custom op (the fbgemm call as it runs eagerly), so that inductor
    fuses everything between them; against eager, alternating. Prints the first call's seconds
    (the compilation) and the decoder latents' difference."""
    import weakref
    from contextlib import contextmanager

    from wuerstchen import quant
    from wuerstchen.bench import print_machine, run_once

    print_machine(torch.get_num_threads())
    pipe, runners = _medium_int8_runners()
    layers = {}
    for model in (pipe.prior, pipe.decoder):
        for m in model.modules():
            if isinstance(m, quant.Int8Linear):
                layers[id(m)] = weakref.ref(m)  # registered before tracing: the op finds its layer by id
    product, fused = quant.Int8Linear._product, quant.Int8Linear.fused

    @torch.library.custom_op("int8bench::product", mutates_args=())
    def product_op(x: torch.Tensor, layer: int, other: torch.Tensor | None) -> torch.Tensor:
        return product(layers[layer](), x, other).clone()

    @product_op.register_fake
    def _(x, layer, other):
        return x.new_empty(*x.shape[:-1], layers[layer]().out_features)

    @torch.library.custom_op("int8bench::fused", mutates_args=())
    def fused_op(x: torch.Tensor, ids: list[int]) -> torch.Tensor:
        first, *others = (layers[i]() for i in ids)
        return torch.cat(fused(first, x, *others), dim=-1)

    @fused_op.register_fake
    def _(x, ids):
        return x.new_empty(*x.shape[:-1], sum(layers[i]().out_features for i in ids))

    def traced_product(layer, x, other):
        return product_op(x, id(layer), other) if torch.compiler.is_compiling() else product(layer, x, other)

    def traced_fused(layer, x, *others):
        if not torch.compiler.is_compiling():
            return fused(layer, x, *others)
        y = fused_op(x, [id(m) for m in (layer, *others)])
        return list(y.split([m.out_features for m in (layer, *others)], dim=-1))

    quant.Int8Linear._product, quant.Int8Linear.fused = traced_product, traced_fused
    pipe.placement.compile({"prior": pipe.prior, "decoder": pipe.decoder}, False, {})
    graphs = pipe.placement.compiled
    t0 = time.perf_counter()
    _, out_compiled = run_once(runners)
    print(f"# first compiled call (compiling prior and decoder): {time.perf_counter() - t0:.1f} s")
    pipe.placement.compiled = {}
    _, out_eager = run_once(runners)
    diff = ((out_compiled[1] - out_eager[1]).abs().mean() / out_eager[1].abs().mean()).item()
    print(f"# decoder latents, compiled against eager: {diff:.2%} mean relative difference")

    @contextmanager
    def with_graphs(which):
        pipe.placement.compiled = which
        yield

    _alternate(runners, {"int8 eager": lambda: with_graphs({}), "int8 compiled": lambda: with_graphs(graphs)}, pairs)


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
    p.add_argument("what", choices=("kernels", "attention", "ceiling", "compiled", "memory", "memory-child"))
    p.add_argument("mode", nargs="?", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4, help="ceiling, compiled: alternating runs of each")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "kernels":
        kernels()
    elif args.what == "attention":
        attention()
    elif args.what == "ceiling":
        ceiling(args.pairs)
    elif args.what == "compiled":
        compiled(args.pairs)
    elif args.what == "memory":
        memory(args.size, args.threads)
    else:
        memory_child(args.mode, args.size)


if __name__ == "__main__":
    main()
