"""KV caches preallocated once per request size and written in place by the block graphs.

Layout per layer: [1, capacity, *row] with row = (kv_heads * head_dim,) (or (kv_heads, head_dim) for
artifacts from safesteer < 0.4). With batch 1 the first ``length`` positions are one contiguous run of
memory, so the graphs read the past and write new entries without copies: ``past`` and ``slot`` hand out
views (host) or address spans (device) that the engine binds directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort


def _check_room(length: int, rows: int, capacity: int) -> int:
    end = length + rows
    if end > capacity:
        raise RuntimeError(f"KV cache overflow: {end} > capacity {capacity}")  # sized by the caller
    return end


class KVCache:
    """Host memory (numpy), for the CPU execution provider."""

    keeps_rows = True  # keep_row can move a lookahead row into place

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
        end = _check_room(self.length, rows, self.capacity)
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

    def host_keys(self, layer: int) -> np.ndarray:
        return self.keys[layer, :, : self.length]


@dataclass(frozen=True)
class DeviceSpan:
    """A contiguous run of device memory, bound by address (what a device cache hands out instead of views)."""

    device: Any  # onnxruntime's C OrtDevice
    dtype: type
    shape: tuple[int, ...]
    ptr: int


class DeviceKVCache:
    """The same layout in memory onnxruntime allocates on ``device`` ("cuda" for the CUDA / TensorRT providers;
    "cpu" works too and is what the CPU tests run). The graphs read and write it in place; nothing crosses
    to the host during decoding.

    Lookahead rows are not moved (that needs a device copy): ``keeps_rows`` is False and the generator feeds
    the chosen token once more instead, which overwrites the scratch rows.
    """

    keeps_rows = False

    def __init__(self, num_layers: int, capacity: int, row: tuple[int, ...], device: str = "cuda",
                 device_id: int = 0, dtype=np.float32):
        shape = [1, capacity, *row]
        alloc = ort.OrtValue.ortvalue_from_shape_and_type
        self._keys = [alloc(shape, dtype, device, device_id) for _ in range(num_layers)]
        self._values = [alloc(shape, dtype, device, device_id) for _ in range(num_layers)]
        self._device = ort.OrtDevice.make(device, device_id)._get_c_device()
        self._dtype, self._row = dtype, tuple(row)
        self._row_bytes = int(np.prod(row)) * np.dtype(dtype).itemsize
        self.capacity = capacity
        self.length = 0

    def _spans(self, layer: int, start: int, rows: int) -> tuple[DeviceSpan, DeviceSpan]:
        shape, offset = (1, rows, *self._row), start * self._row_bytes
        return tuple(DeviceSpan(self._device, self._dtype, shape, v[layer].data_ptr() + offset)
                     for v in (self._keys, self._values))

    def past(self, layer: int) -> tuple[DeviceSpan, DeviceSpan]:
        return self._spans(layer, 0, self.length)

    def slot(self, layer: int, rows: int) -> tuple[DeviceSpan, DeviceSpan]:
        _check_room(self.length, rows, self.capacity)
        return self._spans(layer, self.length, rows)

    def keep_row(self, row: int) -> None:
        raise NotImplementedError("a device KV cache does not move lookahead rows; re-feed the chosen token")

    def advance(self, rows: int) -> None:
        self.length += rows

    def reset(self) -> None:
        self.length = 0

    def host_keys(self, layer: int) -> np.ndarray:
        """A host copy of the committed keys of ``layer`` (tests and debugging; copies the whole layer)."""
        return self._keys[layer].numpy()[:, : self.length]
