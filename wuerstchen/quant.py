"""Int8 inference on the CPU: `pipe.quantize("int8")` or `from_pretrained(..., quantize="int8")`.

    pipe = WuerstchenPipeline.from_pretrained("warp-ai/wuerstchen", quantize="int8")
    pipe.quantize("int8-weights")          # or on a loaded pipeline
    wuerstchen generate "a red circle" --quantize int8

Two modes, for the prior, the decoder and the VQGAN (both generations):

- `"int8"`: the Linear layers of every ResBlock MLP, attention projection and VQGAN MLP hold int8
  weights, one float32 scale per output channel (max |w| / 127), and quantize their input at every
  call. Through fbgemm's dynamically quantized Linear (`torch.ops.quantized.linear_dynamic`, where
  torch has it): one asymmetric 8-bit scale per call's tensor, quantization, int8 product (int32
  sums) and rescaling in one kernel. Elsewhere (`KERNEL = "int_mm"`): one symmetric scale per
  token, y = (q_x · q_wᵀ) · s_x · s_w + b through `torch._int_mm`, the rest as separate ops.
- `"int8-weights"`: the same int8 weights and scales, dequantized into the activations' dtype for
  each call (a layer's float weight exists only during its own product): a quarter of float32's
  weight memory, float32 (or bfloat16) arithmetic.

Why fbgemm first (`python benchmarks/int8.py kernels`, AMD EPYC Zen 4: avx512_vnni, avx512_bf16,
2 threads, idle): `torch._int_mm` alone multiplies fastest, 740–880 GOP/s at the medium prior's and
decoder's shapes against 160–185 GFLOP/s for float32, but with per-token quantization and the
rescaling as separate ops ours ran at 170–650 GOP/s end to end (the int32 → float32 epilogue of
4096 × 1536 outputs is a memory pass of its own), fbgemm's fused call at 575–710 at every shape. In
the medium pipeline the fused path's per-tensor scales cost 0.67% mean relative error of the
decoder latents against 0.50% per token (both against float32; docs/performance.md). torchao's
int8 configs ran at 4–43 GOP/s in eager mode on that CPU, `_weight_int8pack_mm` at 3 GFLOP/s.

Kept in float: every convolution (the first and last layers of each model, the 1×1 mappers that
run once per generation) and the attention's own QKᵀ and PV products; in "int8" also the timestep
mappers (a row per image), the text and semantic condition mappers and the K/V mappers of the text
(once per generation: they cost nothing), which "int8-weights" stores in int8 too (for memory).
Quantized models are not packed for oneDNN (`Placement.placed`): no float copy of any weight. On a
CPU with native bf16 "int8" computes the attention products of 128–4096 queries as bfloat16
matmuls (`kernels.inference_kernels(bf16_attention=True)`, `blocks.BF16_ATTENTION_QUERIES`):
per-head int8 products through `torch._int_mm` were slower than torch's fused float32 kernel at
every medium shape, bfloat16 ones (in chunks of 256 queries) 1.3–1.9× faster (`python
benchmarks/int8.py attention`). An attention's q, k and v projections of the same tokens run as
one fbgemm product (`Int8Linear.fused`: the input quantized once, the same outputs as three calls).

Saved format (`save_pretrained` of a quantized pipeline): the same safetensors file per model,
each quantized Linear `…name.weight` replaced by `…name.qweight` (int8, shape (in, out): the
transposed layout `torch._int_mm` reads; fbgemm's packed copy is made at the first call) and
`…name.weight_scale` (float32, (out,)), its bias as it was; `config.json` says
`"_quantization": "int8"` (or "int8-weights"). Loading builds the float model on the meta device,
swaps in the int8 layers the marker names and assigns the tensors (strict, no code run from the
folder).
"""

from __future__ import annotations

import platform
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import UserError
from .hardware import cpu_flags

if TYPE_CHECKING:
    from .pipeline import WuerstchenPipeline

MODES = ("int8", "int8-weights")
CONFIG_KEY = "_quantization"  # in a quantized model's config.json: its mode
SCALE_SUFFIX = ".weight_scale"  # state-dict keys that stay float32 whatever the model's dtype
MIN_ROWS = 16  # fewer rows: the dequantized float product is as fast (and exact to the weights)
# Linear layers kept in float, by the last part of their name (see the module docstring): the
# timestep mappers (`mapper`, `mapper_sca`, ...) and the condition mappers.
FLOAT_LAYERS = ("mapper", "cond_mapper", "clip_mapper", "kv_mapper")
STAGES = ("prior", "decoder", "vqgan")


def default_kernel() -> str:
    """The int8 product: "fbgemm" where torch has its quantized Linear (x86, ARM), else "int_mm"."""
    try:
        torch.ops.quantized.linear_dynamic  # noqa: B018 (an attribute lookup that raises if missing)
    except (AttributeError, RuntimeError):
        return "int_mm"
    return "fbgemm"


KERNEL = default_kernel()  # the int8 mode's product (see the module docstring)
# Without VNNI fbgemm multiplies u8·s8 pairs into saturating int16 sums: 7-bit activations avoid it.
REDUCE_RANGE = not {"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags() and platform.machine() in ("x86_64", "AMD64")


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise UserError(f"quantize={mode!r}: use one of {', '.join(MODES)} (or None for float)")
    return mode


def check_device(mode: Any, device: torch.device | str | None) -> str:
    """`mode` checked, and refused where it does not run: int8 activations need the CPU kernel."""
    check_mode(mode)
    kind = torch.device(device).type if device is not None else "cpu"
    if mode == "int8" and kind != "cpu":
        raise UserError(f"quantize='int8' (int8 activations) runs on the CPU only, not {kind}: "
                        "use quantize='int8-weights' there (int8 weights, float arithmetic)")  # fmt: skip
    return mode


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float weight → int8 (in, out) and the float32 scale per output channel
    (max |w| / 127: symmetric, the largest weight of a channel maps to ±127)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.t().contiguous(), scale


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) activations → int8 (M, K) and the float32 scale per row (max |x| / 127)."""
    x = x.float()
    # abs then amax: torch's ∞-norm (`linalg.vector_norm(ord=inf)`), one op, runs 5× slower (4096 × 1536).
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)
    return torch.div(x, scale).round_().to(torch.int8), scale


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (per output channel scales); `activations`: int8 inputs too
    (per token), else weight-only (dequantized for each call)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activations: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("qweight", torch.empty(in_features, out_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: bool) -> Int8Linear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activations, w.dtype, w.device)
        layer.qweight, layer.weight_scale = quantize_weight(w)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def extra_repr(self) -> str:
        kind = "int8 activations" if self.activations else "weight-only"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        """`to(dtype)` casts the bias, never the scales (they stay float32), on the new device."""
        scale = self.weight_scale
        super()._apply(fn, recurse)
        # From the meta device (`to_empty`) there are no values to keep: the new empty tensor, in float32.
        self.weight_scale = (self.weight_scale if scale.is_meta else scale).to(self.qweight.device, torch.float32)
        return self

    def dequantized(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> Tensor:
        """The float weight's transpose (in, out) in `dtype` (contiguous, as `qweight`), or its input
        rows [start, stop)."""
        return torch.mul(self.qweight[start:stop], self.weight_scale).to(dtype)

    def _int8_path(self, x: Tensor) -> bool:
        return self.activations and x.device.type == "cpu" and x.numel() >= MIN_ROWS * x.shape[-1]

    def _stamp(self) -> tuple:
        """Where and at which version the layer's tensors are: a packed copy made from them is stale once
        this changes (a load, a cast, a move, an in-place edit)."""
        return tuple((t.data_ptr(), t._version) for t in (self.qweight, self.weight_scale, self.bias) if t is not None)

    def _packed(self, k: int, bias: bool, others: tuple[Int8Linear, ...] = ()) -> Any:
        """fbgemm's packed weight of the input columns [0, k) (with the bias, or without), side by side
        with `others`' (same input width, with their biases), made at the first call and kept while
        the tensors are unchanged (a load, a cast or a move makes a new one)."""
        if self.__dict__.get("_packed_from") != (weights := self._stamp()):  # new or replaced weights: stale packs
            self.__dict__.update(_packed_from=weights, _packs={})
        layers, cache = (self, *others), self.__dict__["_packs"]
        key, stamp = (k, bias, tuple(id(m) for m in others)), tuple(m._stamp() for m in others)
        if key not in cache or cache[key][0] != stamp:  # new, or `others` changed: replaced, not kept
            w = torch.cat([m.qweight[:k] for m in layers], dim=1).t().contiguous()  # (out, k), the packing's layout
            scale = torch.cat([m.weight_scale for m in layers]).double()
            biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in layers]
            zero = torch.zeros(w.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # torch's notice that quantized tensors are deprecated
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(w, scale, zero, 0)
                pack = torch.ops.quantized.linear_prepack(qw, torch.cat(biases).float() if bias else None)
            cache[key] = (stamp, pack)
        return cache[key][1]

    def _product(self, x: Tensor, other: Tensor | None) -> Tensor:
        """x (..., k) · W[:, :k]ᵀ (+ other (..., out), else + bias) in x's dtype."""
        k = x.shape[-1]
        add = other.reshape(-1, other.shape[-1]) if other is not None else self.bias
        if not self._int8_path(x):
            w = self.dequantized(x.dtype, 0, k)  # (k, out), contiguous: x · w is the GEMM's own layout
            y = x.reshape(-1, k) @ w if add is None else torch.addmm(add.to(x.dtype), x.reshape(-1, k), w)
            return y.view(*x.shape[:-1], -1)
        x2 = x.reshape(-1, k).float().contiguous()
        if KERNEL == "fbgemm":  # quantization, int8 product and rescaling in one call
            y = torch.ops.quantized.linear_dynamic(x2, self._packed(k, other is None and add is not None), REDUCE_RANGE)
            y = y if other is None else y.add_(add.float())
        else:
            q, s = quantize_rows(x2)
            # int32 × float32 scale → float32 in one op, then the token scale and the bias in one more.
            y = torch.mul(torch._int_mm(q, self.qweight[:k]), self.weight_scale)
            y = y.mul_(s) if add is None else torch.addcmul(add.float(), y, s, out=y)
        return y.view(*x.shape[:-1], -1).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._product(x, None)

    def fused(self, x: Tensor, *others: Int8Linear) -> list[Tensor]:
        """[this layer(x), each of `others`(x)] (int8 layers of the same input width, e.g. an
        attention's q, k and v): on the fbgemm path one product against their weights side by side,
        x quantized once (each separate call would quantize it with the same scale: the same
        outputs), else one call each."""
        layers = (self, *others)
        if KERNEL != "fbgemm" or not all(m._int8_path(x) for m in layers) or len({m.in_features for m in layers}) > 1:
            return [m(x) for m in layers]
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        y = torch.ops.quantized.linear_dynamic(x2, self._packed(x.shape[-1], True, others), REDUCE_RANGE)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return list(y.split([m.out_features for m in layers], dim=-1))

    def linear_add(self, x: Tensor, other: Tensor) -> Tensor:
        """`x · W[:, :k]ᵀ + other` for x (..., k), as `onednn.linear_add` (Stage B's projected skip)."""
        return self._product(x, other)

    def columns(self, start: int, dtype: torch.dtype) -> Tensor:
        """The float weight's input columns from `start` on, (out, in − start) (Stage B's `project_skip`)."""
        return self.dequantized(dtype, start).t()


def _kept_float(name: str) -> bool:
    """A Linear that the int8 mode keeps in float (`FLOAT_LAYERS`, by the last parts of its name)."""
    return any(p in FLOAT_LAYERS or p.startswith(("mapper_", "clip_")) for p in name.split(".")[-2:])


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace `model`'s Linear layers in place by `Int8Linear`s: in "int8" all but `FLOAT_LAYERS`,
    in "int8-weights" every one (memory is that mode's point: the prior's K/V mappers alone are 75M
    parameters). Works on the meta device too (for loading saved int8 weights). Returns the model."""
    check_mode(mode)
    for name, m in model.named_modules():  # already int8 (a saved quantized model): the mode sets the forward
        if isinstance(m, Int8Linear):
            m.activations = mode == "int8" and not _kept_float(name)
    targets = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and (mode != "int8" or not _kept_float(n))
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear, mode == "int8"))
    model.quantization = mode
    return model


def quantize(pipe: WuerstchenPipeline, mode: str) -> WuerstchenPipeline:
    """`pipe.quantize(mode)`: the prior, decoder and VQGAN quantized in place (see the module
    docstring); text encoders stay as they are (they run once per generation)."""
    check_device(mode, pipe.device)
    for name in STAGES:
        if (model := getattr(pipe, name)) is not None:
            quantize_model(model, mode)
    pipe.placement.compiled.clear()  # a compiled graph would hold the float layers
    return pipe


def cast_state(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """A quantized model's state dict in `dtype`: floats cast, the int8 weights and their scales not."""
    return {k: v.to(dtype) if v.is_floating_point() and not k.endswith(SCALE_SUFFIX) else v for k, v in state.items()}
