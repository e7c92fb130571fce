"""A KV cache preallocated once per request size and written in place by the block graphs.

Layout per layer: [1, capacity, *row] with row = (kv_heads * head_dim,) (or (kv_heads, head_dim) for
artifacts from safesteer < 0.4). With batch 1 the first ``length`` positions are one contiguous run of
memory, so the graphs read the past and write new entries without host copies.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, capacity: int, row: tuple[int, ...], dtype=np.float32):
        shape = (num_layers, 1, capacity, *row)
        self.keys = np.zeros(shape, dtype)
        self.values = np.zeros(shape, dtype)
        self.capacity = capacity
        self.length = 0

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[layer, :, : self.length], self.values[layer, :, : self.length]

    def slot(self, layer: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Where this call's ``rows`` new entries go: right after the committed ones."""
        end = self.length + rows
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")  # sized by the caller
        return self.keys[layer, :, self.length : end], self.values[layer, :, self.length : end]

    def keep_row(self, row: int) -> None:
        """Commit one of several scratch rows written after ``length`` (lookahead): move it to ``length``."""
        if row:
            self.keys[:, :, self.length] = self.keys[:, :, self.length + row]
            self.values[:, :, self.length] = self.values[:, :, self.length + row]
        self.length += 1

    def advance(self, rows: int) -> None:
        self.length += rows

    def reset(self) -> None:
        self.length = 0
