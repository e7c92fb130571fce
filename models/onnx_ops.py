"""Torch ops whose ONNX form is written out by hand, so the decoder graphs stay small.

Each graph node costs a fixed dispatch time on every decode step; a naively traced Llama layer is ~85
nodes (shape arithmetic before every reshape, rotate-half slicing, attention in a dozen ops), these make
it ~20. ``forward`` is the reference computation (what tracing runs); ``symbolic`` is the ONNX op; the
exporter's validation compares the two through onnxruntime against the Hugging Face model.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

# False: onnxruntime's fused contrib ops (fastest on onnxruntime). True: standard ONNX opset-23 ops only
# (RotaryEmbedding, RMSNormalization, Attention) for TensorRT and other runtimes without the contrib ops.
_STANDARD_OPS = contextvars.ContextVar("safesteer_standard_ops", default=False)
# True: attention may look ahead of the row where the mask allows it (GroupQueryAttention causal=0; see
# rows_may_look_ahead)
_LOOKS_AHEAD = contextvars.ContextVar("safesteer_looks_ahead", default=False)


@contextlib.contextmanager
def standard_ops(enabled: bool = True):
    """Within this block, the ops below export as standard ONNX ops (``safesteer-export --standard-ops``)."""
    token = _STANDARD_OPS.set(enabled)
    try:
        yield
    finally:
        _STANDARD_OPS.reset(token)


class _Rotary(torch.autograd.Function):
    """RoPE (rotate-half layout) over [b, s, heads * d]: onnxruntime's com.microsoft RotaryEmbedding, or the
    opset-23 standard one."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_table, sin_table, num_heads):
        b, s, width = x.shape
        d = width // num_heads
        cos = torch.cat([cos_table[position_ids]] * 2, dim=-1).unsqueeze(2)  # [b, s, 1, d]
        sin = torch.cat([sin_table[position_ids]] * 2, dim=-1).unsqueeze(2)
        x = x.reshape(b, s, num_heads, d)
        rotated = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
        return (x * cos + rotated * sin).reshape(b, s, width)

    @staticmethod
    def symbolic(g, x, position_ids, cos_table, sin_table, num_heads):
        if _STANDARD_OPS.get():  # opset 23: inputs in another order
            out = g.op(f"{OPSET23_DOMAIN}::RotaryEmbedding", x, cos_table, sin_table, position_ids,
                       interleaved_i=0, num_heads_i=num_heads)
        else:
            out = g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos_table, sin_table,
                       interleaved_i=0, num_heads_i=num_heads)
        out.setType(x.type())
        return out


def rotary(x: torch.Tensor, position_ids: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    """RoPE on x [b, s, heads * d] at ``position_ids`` [b, s]; tables [positions, d / 2] (cos/sin of pos * freq)."""
    return _Rotary.apply(x, position_ids, cos_table, sin_table, int(num_heads))


OPSET23_DOMAIN = "safesteer.opset23"  # placeholder domain: graphs.finish_block moves these nodes to ONNX opset 23


class _Attention(torch.autograd.Function):
    """ONNX (opset 23) Attention with grouped K/V heads and an additive mask: q [b, s, heads * d], k / v
    [b, t, kv_heads * d], mask [b, 1, s, t]; query head h reads K/V head h // (heads / kv_heads). ``softcap`` > 0:
    scores become softcap * tanh(scores / softcap) before the mask (Gemma 2)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, heads, kv_heads, scale, softcap):
        b, s, width = q.shape
        d, groups = width // heads, heads // kv_heads
        q = q.reshape(b, s, kv_heads, groups, d).permute(0, 2, 3, 1, 4)  # [b, kvh, groups, s, d]
        k = k.reshape(b, -1, kv_heads, 1, d).permute(0, 2, 3, 4, 1)  # [b, kvh, 1, d, t]
        v = v.reshape(b, -1, kv_heads, 1, d).permute(0, 2, 3, 1, 4)  # [b, kvh, 1, t, d]
        scores = torch.matmul(q, k) * scale
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores + mask.unsqueeze(1), dim=-1)
        return torch.matmul(probs, v).permute(0, 3, 1, 2, 4).reshape(b, s, width)

    @staticmethod
    def symbolic(g, q, k, v, mask, heads, kv_heads, scale, softcap):
        extra = {"softcap_f": softcap} if softcap > 0 else {}
        out = g.op(f"{OPSET23_DOMAIN}::Attention", q, k, v, mask, q_num_heads_i=heads, kv_num_heads_i=kv_heads,
                   scale_f=scale, **extra)
        out.setType(q.type())
        return out


class _CachedAttention(torch.autograd.Function):
    """onnxruntime's com.microsoft GroupQueryAttention over a KV cache it writes in place: ``past_k`` / ``past_v``
    [b, kv_heads, capacity, d] are the whole cache buffers (the runtime binds each to both the input and the
    output), this call's new rows k / v [b, s, kv_heads * d] land at positions [total - s, total), where total =
    mask.shape[3] (seqlens_k = total - 1), and attention reads positions [0, total) under the additive ``mask``
    (lookahead trees, windows), within GroupQueryAttention's causal rule unless rows may look ahead (causal = 0)."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, mask, heads, kv_heads, scale, softcap):
        b, s, _ = k.shape
        total, d = mask.shape[3], past_k.shape[3]
        start = total - s  # where this call's rows go
        # (written in this order and read from the inputs: other forms trip the TorchScript peephole pass when
        # kv_heads is 1)
        present_k, present_v = (torch.index_copy(past, 2, torch.arange(start, total),
                                                 new.reshape(b, s, kv_heads, d).transpose(1, 2))
                                for past, new in ((past_k, k), (past_v, v)))
        keys, values = (torch.cat((past[:, :, :start].transpose(1, 2).reshape(b, start, -1), new), dim=1)
                        for past, new in ((past_k, k), (past_v, v)))
        return _Attention.forward(ctx, q, keys, values, mask, heads, kv_heads, scale, softcap), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, mask, heads, kv_heads, scale, softcap):
        # total_sequence_length / seqlens_k from the mask's last dim (identical per layer: onnxruntime merges them)
        total = g.op("Cast", g.op("Shape", mask, start_i=3, end_i=4), to_i=6)  # int32 [1]
        seqlens = g.op("Sub", total, g.op("Constant", value_t=torch.tensor([1], dtype=torch.int32)))
        total = g.op("Squeeze", total)
        extra = {"softcap_f": softcap} if softcap > 0 else {}
        unused = g.op("prim::Constant")  # an omitted optional input (cos / sin caches, position ids: RoPE is ours)
        unused.setType(torch._C.OptionalType.ofTensor())
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens, total, unused, unused, unused,
            mask, num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale, causal_i=int(not _LOOKS_AHEAD.get()),
            outputs=3, **extra)
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


@contextlib.contextmanager
def rows_may_look_ahead(enabled: bool = True):
    """Within this block, cached attention lets the mask alone decide (for prefill rows that see later rows: an
    image's tokens in Gemma 3). Otherwise GroupQueryAttention also applies its causal rule, which every other mask
    satisfies (causal, lookahead tree, window): the kernel's usual mode (the same speed on this CPU; GPU kernels
    are built around it)."""
    token = _LOOKS_AHEAD.set(enabled)
    try:
        yield
    finally:
        _LOOKS_AHEAD.reset(token)


def in_place_cache() -> bool:
    """Whether blocks exported now keep their KV cache in place (GroupQueryAttention, the default) or take the past
    and return the new rows (standard ops: Concat + Attention, for TensorRT)."""
    return not _STANDARD_OPS.get()


def cached_attention(q, k, v, past_k, past_v, mask, heads: int, kv_heads: int, scale: float,
                     softcap: float | None = None):
    """Attention of this call's rows over the cache and themselves -> (output, K out, V out).

    q [b, s, heads * d]; k, v [b, s, kv_heads * d] (RoPE applied to q and k); mask [b, 1, s, past + s] additive.
    In-place cache (in_place_cache()): past_k / past_v are the whole buffers [b, kv_heads, capacity, d] and K/V out
    are them with the new rows written. Standard ops: past_k / past_v are [b, past, kv_heads * d] and K/V out are
    the new rows (the runtime stores them)."""
    heads, kv_heads, scale, softcap = int(heads), int(kv_heads), float(scale), float(softcap or 0.0)
    if in_place_cache():
        return _CachedAttention.apply(q, k, v, past_k, past_v, mask, heads, kv_heads, scale, softcap)
    keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)
    return _Attention.apply(q, keys, values, mask, heads, kv_heads, scale, softcap), k, v


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _norm_node(g, x, weight, eps):
    """onnxruntime's SimplifiedLayerNormalization (its default-domain contrib op), or opset-23 RMSNormalization."""
    op = "RMSNormalization" if _STANDARD_OPS.get() else "SimplifiedLayerNormalization"
    return g.op(f"{OPSET23_DOMAIN}::{op}", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm as one node (see _norm_node)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        return _rms(x, weight, eps)

    @staticmethod
    def symbolic(g, x, weight, eps):
        out = _norm_node(g, x, weight, eps)
        out.setType(x.type())
        return out


class _SkipRMSNorm(torch.autograd.Function):
    """onnxruntime's com.microsoft SkipSimplifiedLayerNormalization: the residual add and the next RMSNorm in one
    node (standard ops: Add + RMSNormalization); returns (normalised sum, sum)."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps):
        total = x + skip
        return _rms(total, weight, eps), total

    @staticmethod
    def symbolic(g, x, skip, weight, eps):
        if _STANDARD_OPS.get():
            total = g.op("Add", x, skip)
            out = _norm_node(g, total, weight, eps)
        else:
            out, _mean, _inv_std, total = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, weight,
                                               epsilon_f=eps, outputs=4)
        out.setType(x.type())
        total.setType(x.type())
        return out, total


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps"))


def rms_norm(x: torch.Tensor, norm, offset: float = 0.0) -> torch.Tensor:
    """``norm`` (a Hugging Face RMSNorm module) applied to x, as one graph node. ``offset``: Gemma's norms scale by
    (offset + weight) with offset 1."""
    return _RMSNorm.apply(x, norm.weight + offset if offset else norm.weight, _eps(norm))


def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + skip), x + skip) as one graph node: the residual add fused with the following RMSNorm."""
    return _SkipRMSNorm.apply(x, skip, norm.weight, _eps(norm))
