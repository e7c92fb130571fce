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
    """ONNX (opset 23) Attention with grouped K/V heads and an additive mask, over 3-D [b, seq, heads * d];
    ``softcap`` > 0: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2)."""

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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, heads: int, kv_heads: int,
              scale: float, softcap: float | None = None) -> torch.Tensor:
    """q [b, s, heads * d]; k, v [b, t, kv_heads * d]; mask [b, 1, s, t] additive -> [b, s, heads * d].
    Query head h reads K/V head h // (heads / kv_heads)."""
    return _Attention.apply(q, k, v, mask, int(heads), int(kv_heads), float(scale), float(softcap or 0.0))


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
