"""Torch ops whose ONNX form is written out by hand, so the decoder graphs stay small.

Traced shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat before every Reshape) is most of the
nodes of a naively exported layer, and each node costs a fixed dispatch time on every decode step.
"""

from __future__ import annotations

import torch


class _Reshape(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shape):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(dims)

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ONNX Reshape semantics with a constant shape: 0 copies the input's dim, -1 (exactly one) is inferred."""
    return _Reshape.apply(x, tuple(int(d) for d in shape))


class _Rotary(torch.autograd.Function):
    """onnxruntime's com.microsoft RotaryEmbedding (rotate-half layout) over [b, s, heads * d]."""

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
        return g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos_table, sin_table,
                    interleaved_i=0, num_heads_i=num_heads)


def rotary(x: torch.Tensor, position_ids: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    """RoPE on x [b, s, heads * d] at ``position_ids`` [b, s]; tables [positions, d / 2] (cos/sin of pos * freq)."""
    return _Rotary.apply(x, position_ids, cos_table, sin_table, int(num_heads))
