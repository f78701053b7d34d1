"""Building blocks shared by Stage B and Stage C.

Tensors inside the networks are NCHW in shape but are kept in channels-last memory layout, so the
NHWC view that LayerNorm, the Linear layers and attention want is a free `permute`, not a copy.
Parameter names follow diffusers' deprecated Würstchen modules so its folders load as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .onednn import Linear, linear, linear_add


def channel_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the channels of an NCHW tensor, no affine (Würstchen's `LayerNorm2d`)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)


class ChannelNorm(nn.Module):
    """Module form of `channel_norm` (has no parameters; kept so Sequential indices match)."""

    def forward(self, x: Tensor) -> Tensor:
        return channel_norm(x)


def to_channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def r_embedding(r: Tensor, c_r: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of the continuous time r ∈ [0, 1]: (B,) → (B, c_r), float32.

    Frequencies are log-spaced over `half - 1` intervals and the argument is `r * 10000` (the
    official code); `[sin, cos]`, zero-padded when c_r is odd.
    """
    half = c_r // 2
    freqs = torch.exp(
        torch.arange(half, device=r.device, dtype=torch.float32) * -(math.log(max_positions) / (half - 1))
    )
    args = (r.float() * max_positions)[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC tensors: `γ·(x·n) + β + x`, `n = ‖x‖_HW / mean_c ‖x‖_HW`.

    A fast path inside `kernels.inference_kernels()`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        if kernels.active():
            return self._forward_fast(x)
        # vector_norm's gradient is 0 where a channel is all zeros; √Σx²'s would be inf·0 = NaN.
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x

    def _forward_fast(self, x: Tensor) -> Tensor:
        """‖x‖ over H, W as √Σx², 5–10× faster on a CPU than `linalg.vector_norm` over the two
        non-innermost dims of an NHWC tensor (the sum accumulates in float32 for bfloat16 too; float16
        squares could overflow, so they are summed as float32), and the tail as one pass over x:
        γ·(x·n) + β + x = x·(γ·n + 1) + β."""
        wide = torch.float32 if x.dtype == torch.float16 else None
        g = x.square().sum(dim=(1, 2), keepdim=True, dtype=wide).sqrt().to(x.dtype)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.beta, x, self.gamma * n + 1)


class MLP(nn.Sequential):
    """`nn.Sequential(Linear, GELU, ...)` whose first Linear and GELU run as one oneDNN op inside
    `onednn.packed_linears()` (parameter names keep the Sequential's indices)."""

    def forward(self, x: Tensor) -> Tensor:
        first, act = self[0], self[1]
        if type(first) is not Linear or type(act) is not nn.GELU or act.approximate != "none":
            return super().forward(x)  # e.g. a LoRA wrapper in place of the first Linear
        return self.tail(linear(x, first.weight, first.bias, gelu=True))

    def tail(self, h: Tensor) -> Tensor:
        """The layers after the GELU, on `h` = GELU(first Linear)."""
        for i, layer in enumerate(self):
            if i > 1:
                h = layer(h)
        return h


def _channelwise(c_in: int, c: int, dropout: float) -> MLP:
    # Indices 0, 2, 4 carry parameters: the names `channelwise.{0,2,4}` of the checkpoints.
    return MLP(Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), Linear(c * 4, c))


class ResBlock(nn.Module):
    """Stage C's ResBlock: the skip is concatenated before the depthwise conv."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.channelwise = _channelwise(c, c, dropout)

    def forward(self, x: Tensor, x_skip: Tensor | None = None) -> Tensor:
        h = x if x_skip is None else torch.cat([x, x_skip], dim=1)
        h = self.depthwise(h).permute(0, 2, 3, 1)  # NHWC view (channels-last storage)
        h = F.layer_norm(h, (h.shape[-1],), eps=1e-6)
        return x + self.channelwise(h).permute(0, 3, 1, 2)


class ResBlockStageB(nn.Module):
    """Stage B's ResBlock: the skip (effnet condition, U-Net skip) is concatenated after the norm.

    The semantic condition is the same at every sampling step, and so is its share of the first
    channelwise Linear (about 30% of a decoder's Linear FLOPs): `project_skip` computes it once per
    generation and `forward(..., projected=...)` adds it instead of concatenating the condition.
    """

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.channelwise = _channelwise(c + c_skip, c, dropout)

    def project_skip(self, skip: Tensor) -> Tensor:
        """The first Linear applied to `skip` (B, k, H, W), the last k of its input channels, plus
        its bias: (B, H, W, 4c), to pass as `projected`."""
        first, k = self.channelwise[0], skip.shape[1]
        weight = first.columns(first.in_features - k, skip.dtype) if hasattr(first, "columns") else first.weight[:, -k:]
        return F.linear(skip.permute(0, 2, 3, 1), weight, first.bias)

    def forward(self, x: Tensor, x_skip: Tensor | None = None, projected: Tensor | None = None) -> Tensor:
        """`x_skip` is concatenated to the normed features; `projected` (from `project_skip`) stands
        for channels after it that were projected ahead."""
        h = self.depthwise(x).permute(0, 2, 3, 1)
        h = F.layer_norm(h, (h.shape[-1],), eps=1e-6)
        if x_skip is not None:
            h = torch.cat([h, x_skip.permute(0, 2, 3, 1)], dim=-1)
        if projected is None:
            return x + self.channelwise(h).permute(0, 3, 1, 2)
        # projected + h · W[:, :k]ᵀ in one GEMM.
        mlp = self.channelwise
        first = mlp[0]  # an int8 layer (wuerstchen.quant) has its own
        y = first.linear_add(h, projected) if hasattr(first, "linear_add") else linear_add(h, first.weight, projected)
        h = mlp.tail(mlp[1](y))
        return x + h.permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """`x·(1 + a) + b` with `a, b = Linear(r_emb)`.

    Stable Cascade adds one mapper per extra time-like condition (`conds`, e.g. "sca", "crp"):
    r_emb is then the embeddings of r and of each condition side by side, (B, c_r·(1 + len(conds))),
    and their (a, b) are summed."""

    def __init__(self, c: int, c_r: int, conds: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.mapper = Linear(c_r, c * 2)
        self.conds = tuple(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", Linear(c_r, c * 2))

    def forward(self, x: Tensor, r_emb: Tensor) -> Tensor:
        parts = r_emb.chunk(len(self.conds) + 1, dim=1)
        ab = self.mapper(parts[0])
        for name, emb in zip(self.conds, parts[1:], strict=True):
            ab = ab + getattr(self, f"mapper_{name}")(emb)
        a, b = ab[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


# Queries up to which `attention` multiplies out the scores in bfloat16 on a CPU (see there).
MATMUL_ATTENTION_MAX_QUERIES = 512
# Queries for which float32 attention runs as bfloat16 matmuls inside `bf16_attention` (the int8
# pipeline on a CPU with native bf16), in chunks of `BF16_ATTENTION_CHUNK` queries. Against torch's
# fused float32 kernel on a 2-core Zen 4 (`python benchmarks/int8.py attention`): 1.6× at 144
# queries, 1.3× at 256, 1.4–1.9× at 1024, 1.4× at 4096 (the 1024² decoder; unchunked, its 137 MB of
# bfloat16 scores made it 1.7× slower than the fused kernel), slower at 64.
BF16_ATTENTION_QUERIES = (128, 4096)
BF16_ATTENTION_CHUNK = 256  # queries per product in `_bf16_attention`


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """`scaled_dot_product_attention` of (B, heads, N, d) tensors, except inside
    `kernels.inference_kernels()` in bfloat16 on a CPU for at most `MATMUL_ATTENTION_MAX_QUERIES`
    queries: there two bf16 matmuls with a softmax between them beat torch's fused kernel, 1.3–1.55×
    at 144–256 queries on 2 cores (the medium prior's and the decoder's deeper levels), while from
    ~600 queries on the fused kernel is faster. The scores are rounded to bfloat16 before the
    softmax (torch has no CPU matmul with a wider output); `wuerstchen bench` finds the bfloat16
    decoder latents as far from the float32 ones as with the fused kernel (0.47% mean relative
    error). Inside `inference_kernels(bf16_attention=True)` float32 q, k, v with
    `BF16_ATTENTION_QUERIES` queries are multiplied so too, in bfloat16, and the result returned in
    float32 (the int8 pipeline on a CPU with native bf16: 0.5% error per call, see there)."""
    if q.device.type != "cpu" or dropout_p or not kernels.active():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if q.dtype == torch.bfloat16 and q.shape[-2] <= MATMUL_ATTENTION_MAX_QUERIES:
        return _matmul_attention(q, k, v)
    lo, hi = BF16_ATTENTION_QUERIES
    if q.dtype == torch.float32 and lo <= q.shape[-2] <= hi and kernels.bf16_attention():
        return _bf16_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    return torch.softmax(scores, dim=-1) @ v


def _bf16_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Float32 (B, heads, N, d) q, k, v → float32 attention, its products in bfloat16, in chunks of
    `BF16_ATTENTION_CHUNK` queries: q's scale is applied in its cast (one pass, contiguous), each
    chunk's scores stay small (cache-sized, no fresh pages), and each chunk's output is written
    straight into a (B, N, heads, d) buffer, so the caller's merge of the heads is a view."""
    b, h, n, d = q.shape
    qb = torch.empty(q.shape, dtype=torch.bfloat16)
    torch.mul(q, d**-0.5, out=qb)
    kt, vb = k.to(torch.bfloat16).transpose(-1, -2), v.to(torch.bfloat16)
    out = q.new_empty(b, n, h, d).transpose(1, 2)
    for i in range(0, n, BF16_ATTENTION_CHUNK):
        scores = qb[:, :, i : i + BF16_ATTENTION_CHUNK] @ kt
        out[:, :, i : i + BF16_ATTENTION_CHUNK] = torch.softmax(scores, dim=-1) @ vb
    return out


def _projections(x: Tensor, *layers: nn.Module) -> list[Tensor]:
    """Each layer applied to x: int8 layers of one kind (wuerstchen.quant) in one product."""
    first = layers[0]
    if hasattr(first, "fused") and all(type(m) is type(first) for m in layers):
        return first.fused(x, *layers[1:])
    return [m(x) for m in layers]


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout  # on the attention weights, as nn.MultiheadAttention in the original
        self.to_q = Linear(c, c)
        self.to_k = Linear(c, c)
        self.to_v = Linear(c, c)
        self.to_out = nn.Sequential(Linear(c, c))

    def heads(self, t: Tensor) -> Tensor:
        """(B, N, C) → (B, heads, N, C/heads)."""
        return t.unflatten(-1, (self.nhead, -1)).transpose(1, 2)


class AttnBlock(nn.Module):
    """`x + MHA(norm(x), [norm(x) tokens ; kv tokens])`, `kv = Linear(SiLU(cond))`.

    The text part of K/V (`kv_mapper` → `to_k`/`to_v`) does not change across sampling steps, so
    `text_kv` computes it once per generation and `forward` accepts the result.
    """

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.attention = Attention(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), Linear(c_cond, c))

    def text_kv(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """cond (B, L, c_cond) → keys, values (B, heads, L, d)."""
        attn, kv = self.attention, self.kv_mapper(cond)
        if self.self_attn and hasattr(attn.to_q, "fused"):
            # int8 layers: through the q, k, v product `forward` runs (no packed weights of their own
            # for k and v; the text's q, once per generation, is thrown away).
            _, k, v = _projections(kv, attn.to_q, attn.to_k, attn.to_v)
        else:
            k, v = attn.to_k(kv), attn.to_v(kv)
        return attn.heads(k), attn.heads(v)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        attn = self.attention
        b, c, h, w = x.shape
        tokens = channel_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        k, v = kv
        if self.self_attn:
            q, k_x, v_x = _projections(tokens, attn.to_q, attn.to_k, attn.to_v)
            k = torch.cat([attn.heads(k_x), k], dim=2)
            v = torch.cat([attn.heads(v_x), v], dim=2)
        else:
            q = attn.to_q(tokens)
        q = attn.heads(q)
        dropout_p = attn.dropout if self.training else 0.0
        o = attention(q, k, v, dropout_p=dropout_p)
        o = attn.to_out(o.transpose(1, 2).reshape(b, h * w, c))
        return x + o.view(b, h, w, c).permute(0, 3, 1, 2)
