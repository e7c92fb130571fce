"""KV caches preallocated once per request size and written in place by the block graphs.

Layout per layer: [1, capacity, *row] with row = (kv_heads * head_dim,) (or (kv_heads, head_dim) for
artifacts from safesteer < 0.4). With batch 1 the first ``length`` positions are one contiguous run of
memory, so the graphs read the past and write new entries without copies: ``past`` and ``slot`` hand out
address spans that the engine binds directly (base addresses are computed once; a decode step binds
four spans per layer, so per-span cost matters).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

HOST = ort.OrtDevice.make("cpu", 0)._get_c_device()


class Span(NamedTuple):
    """A contiguous run of memory in onnxruntime's bind-by-address form: (device, element type, shape, address)."""

    device: Any  # onnxruntime's C OrtDevice
    dtype: type
    shape: list
    ptr: int


class _Cache:
    """Length bookkeeping and spans over per-layer K and V buffers at ``key_ptrs`` / ``value_ptrs``."""

    keeps_rows = False

    def __init__(self, capacity: int, row: tuple[int, ...], dtype, device, key_ptrs: list[int],
                 value_ptrs: list[int]):
        self.capacity, self.length = capacity, 0
        self._row, self._dtype, self._device = list(row), dtype, device
        self._row_bytes = int(np.prod(row)) * np.dtype(dtype).itemsize
        self._ptrs = (key_ptrs, value_ptrs)

    def _spans(self, layer: int, start: int, rows: int) -> tuple[Span, Span]:
        shape, offset = [1, rows, *self._row], start * self._row_bytes
        keys, values = self._ptrs
        return (Span(self._device, self._dtype, shape, keys[layer] + offset),
                Span(self._device, self._dtype, shape, values[layer] + offset))

    def past(self, layer: int) -> tuple[Span, Span]:
        return self._spans(layer, 0, self.length)

    def slot(self, layer: int, rows: int) -> tuple[Span, Span]:
        """Where this call's ``rows`` new entries go: right after the committed ones."""
        if self.length + rows > self.capacity:  # sized by the caller
            raise RuntimeError(f"KV cache overflow: {self.length + rows} > capacity {self.capacity}")
        return self._spans(layer, self.length, rows)

    def advance(self, rows: int) -> None:
        self.length += rows

    def reset(self) -> None:
        self.length = 0


class KVCache(_Cache):
    """Host memory (numpy), for the CPU execution provider."""

    keeps_rows = True  # keep_row can move a lookahead row into place

    def __init__(self, num_layers: int, capacity: int, row: tuple[int, ...], dtype=np.float32):
        shape = (num_layers, 1, capacity, *row)
        self.keys = np.zeros(shape, dtype)
        self.values = np.zeros(shape, dtype)
        super().__init__(capacity, row, np.dtype(dtype).type, HOST, [k.ctypes.data for k in self.keys],
                         [v.ctypes.data for v in self.values])

    def keep_row(self, row: int) -> None:
        """Commit one of several scratch rows written after ``length`` (lookahead): move it to ``length``."""
        if row:
            self.keys[:, :, self.length] = self.keys[:, :, self.length + row]
            self.values[:, :, self.length] = self.values[:, :, self.length + row]
        self.length += 1

    def host_keys(self, layer: int) -> np.ndarray:
        return self.keys[layer, :, : self.length]


class DeviceKVCache(_Cache):
    """The same layout in memory onnxruntime allocates on ``device`` ("cuda" for the CUDA / TensorRT providers;
    "cpu" works too and is what the CPU tests run). The graphs read and write it in place; nothing crosses
    to the host during decoding.

    Lookahead rows are not moved (that needs a device copy): ``keeps_rows`` is False and the generator feeds
    the chosen token once more instead, which overwrites the scratch rows.
    """

    def __init__(self, num_layers: int, capacity: int, row: tuple[int, ...], device: str = "cuda",
                 device_id: int = 0, dtype=np.float32):
        shape = [1, capacity, *row]
        alloc = ort.OrtValue.ortvalue_from_shape_and_type
        self._keys = [alloc(shape, dtype, device, device_id) for _ in range(num_layers)]
        self._values = [alloc(shape, dtype, device, device_id) for _ in range(num_layers)]
        super().__init__(capacity, row, np.dtype(dtype).type, ort.OrtDevice.make(device, device_id)._get_c_device(),
                         [k.data_ptr() for k in self._keys], [v.data_ptr() for v in self._values])

    def host_keys(self, layer: int) -> np.ndarray:
        """A host copy of the committed keys of ``layer`` (tests and debugging; copies the whole layer)."""
        return self._keys[layer].numpy()[:, : self.length]
