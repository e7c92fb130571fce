"""4-D additive attention masks [1, 1, rows, past + rows]: 0 = may attend, dtype min = may not."""

from __future__ import annotations

import numpy as np


def causal_mask(past_len: int, rows: int, dtype=np.float32) -> np.ndarray:
    """Prefill / plain decode: row i sees the whole past and rows 0..i of this call."""
    blocked = np.finfo(dtype).min
    mask = np.zeros((1, 1, rows, past_len + rows), dtype=dtype)
    if rows > 1:
        mask[0, 0, :, past_len:] = np.triu(np.full((rows, rows), blocked, dtype=dtype), k=1)
    return mask


def tree_mask(past_len: int, rows: int, dtype=np.float32) -> np.ndarray:
    """Lookahead: each of ``rows`` candidates at the same position sees the past and itself, never the others."""
    blocked = np.finfo(dtype).min
    mask = np.zeros((1, 1, rows, past_len + rows), dtype=dtype)
    mask[0, 0, :, past_len:] = np.where(np.eye(rows, dtype=bool), 0.0, blocked).astype(dtype)
    return mask
