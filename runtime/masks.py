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


def windowed(mask: np.ndarray, positions: np.ndarray, window: int) -> np.ndarray:
    """``mask`` [1, 1, rows, past + rows] with keys ``window`` or more positions behind their query blocked too (a
    sliding-window layer's mask; Hugging Face's rule: key position > query position - window). The first ``past``
    keys sit at positions 0..past-1 (the cache), the call's own rows at ``positions`` [1, rows]."""
    rows = positions.shape[1]
    keys = np.concatenate([np.arange(mask.shape[3] - rows), positions[0]])
    far = positions[0][:, None] - keys[None, :] >= window
    return np.where(far[None, None], np.finfo(mask.dtype).min, mask).astype(mask.dtype)


def tree_mask(past_len: int, rows: int, dtype=np.float32, passes: int = 1) -> np.ndarray:
    """Lookahead: ``rows`` branches side by side. Pass 0 is one candidate per row at the same position; after
    ``passes - 1`` earlier passes (their rows stored after the past, pass by pass) each row sees the past, its own
    branch's earlier rows and itself, never another branch."""
    blocked = np.finfo(dtype).min
    own = np.where(np.eye(rows, dtype=bool), 0.0, blocked).astype(dtype)
    mask = np.zeros((1, 1, rows, past_len + passes * rows), dtype=dtype)
    mask[0, 0, :, past_len:] = np.tile(own, (1, passes))
    return mask


def both_ways(mask: np.ndarray, runs: list[tuple[int, int]]) -> np.ndarray:
    """``mask`` with the call's rows in each [start, end) run seeing each other in both directions (Gemma 3's image
    tokens at prefill; sliding layers still apply their window on top, masks.windowed)."""
    out = mask.copy()
    past = mask.shape[3] - mask.shape[2]
    for start, end in runs:
        out[0, 0, start:end, past + start : past + end] = 0
    return out
