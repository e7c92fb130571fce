"""KV caches preallocated once per request size and written in place by the block graphs.

Two layouts, after the artifact's blocks:
- in place (the default export, GroupQueryAttention): per layer one buffer [1, kv_heads, capacity, head_dim] for K
  and one for V; the engine binds each buffer to the block's past_key input and present_key output once, and the
  graph writes its new rows at their positions itself. Nothing is rebound per step.
- rows (``--standard-ops`` exports: Concat + Attention, for TensorRT): per layer [1, capacity, kv_heads * head_dim];
  a step binds the committed positions as the past and the span after them for the graph's new rows. With batch 1
  the first ``length`` positions are one contiguous run of memory, so neither side copies.

The caller commits the rows it keeps (``advance``; ``keep_row`` moves one lookahead row into place on the host).
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
    """Length bookkeeping and spans over per-layer K and V buffers of ``shape`` at ``key_ptrs`` / ``value_ptrs``."""

    keeps_rows = False

    def __init__(self, capacity: int, shape: tuple[int, ...], in_place: bool, dtype, device, key_ptrs: list[int],
                 value_ptrs: list[int]):
        self.capacity, self.length, self.in_place = capacity, 0, in_place
        self._shape, self._dtype, self._device = list(shape), dtype, device
        self._row_bytes = int(np.prod(shape[2:])) * np.dtype(dtype).itemsize  # rows layout: one position
        self._ptrs = (key_ptrs, value_ptrs)

    @staticmethod
    def layer_shape(capacity: int, kv_heads: int, head_dim: int, in_place: bool) -> tuple[int, ...]:
        return (1, kv_heads, capacity, head_dim) if in_place else (1, capacity, kv_heads * head_dim)

    def buffers(self, layer: int) -> tuple[Span, Span]:
        """In place: a layer's whole K and V buffers (bound as both the past input and the present output)."""
        keys, values = self._ptrs
        return (Span(self._device, self._dtype, self._shape, keys[layer]),
                Span(self._device, self._dtype, self._shape, values[layer]))

    def _spans(self, layer: int, start: int, rows: int) -> tuple[Span, Span]:
        shape, offset = [1, rows, *self._shape[2:]], start * self._row_bytes
        keys, values = self._ptrs
        return (Span(self._device, self._dtype, shape, keys[layer] + offset),
                Span(self._device, self._dtype, shape, values[layer] + offset))

    def past(self, layer: int) -> tuple[Span, Span]:
        """Rows layout: the committed positions."""
        return self._spans(layer, 0, self.length)

    def slot(self, layer: int, rows: int) -> tuple[Span, Span]:
        """Rows layout: where this call's ``rows`` new entries go, right after the committed ones."""
        return self._spans(layer, self.length, rows)

    def check_room(self, rows: int) -> None:
        if self.length + rows > self.capacity:  # sized by the caller
            raise RuntimeError(f"KV cache overflow: {self.length + rows} > capacity {self.capacity}")

    def advance(self, rows: int) -> None:
        self.length += rows

    def reset(self) -> None:
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (a rewound step; lookahead scratch rows)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def stored(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the K and V at positions [start, stop) (default: the committed ones) of every layer,
        [layers, 1, positions, kv_heads * head_dim] in either layout (tests and debugging)."""
        stop = self.length if stop is None else stop
        out = []
        for buf in self._host_buffers():  # [layers, 1, ...] in this cache's layout
            if self.in_place:  # [layers, 1, kv_heads, capacity, head_dim]
                buf = buf[:, :, :, start:stop].transpose(0, 1, 3, 2, 4)
            else:
                buf = buf[:, :, start:stop]
            out.append(buf.reshape(*buf.shape[:3], -1).copy())
        return out[0], out[1]

    def _host_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class KVCache(_Cache):
    """Host memory (numpy), for the CPU execution provider."""

    keeps_rows = True  # keep_row can move a lookahead row into place

    def __init__(self, num_layers: int, capacity: int, kv_heads: int, head_dim: int, in_place: bool,
                 dtype=np.float32):
        shape = self.layer_shape(capacity, kv_heads, head_dim, in_place)
        self.keys = np.zeros((num_layers, *shape), dtype)
        self.values = np.zeros((num_layers, *shape), dtype)
        super().__init__(capacity, shape, in_place, np.dtype(dtype).type, HOST, [k.ctypes.data for k in self.keys],
                         [v.ctypes.data for v in self.values])

    def compact(self, slots: np.ndarray) -> None:
        """Move the positions at ``slots`` (increasing) to the front, in that order; they become the committed
        ones (a Batch reclaiming the slots of finished requests and discarded rows)."""
        at = (slice(None),) * (3 if self.in_place else 2)
        for buf in (self.keys, self.values):
            buf[(*at, slice(0, len(slots)))] = buf[(*at, slots)]
        self.length = len(slots)

    def keep_row(self, row: int) -> None:
        """Commit one of several scratch rows written after ``length`` (lookahead): move it to ``length``."""
        if row:
            at = (slice(None),) * (3 if self.in_place else 2)  # [layer, 1, (kv_heads,)] then the position axis
            for buf in (self.keys, self.values):
                buf[(*at, self.length)] = buf[(*at, self.length + row)]
        self.length += 1

    def _host_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        return self.keys, self.values


class DeviceKVCache(_Cache):
    """The same layouts in memory onnxruntime allocates on ``device`` ("cuda" for the CUDA / TensorRT providers;
    "cpu" works too and is what the CPU tests run). The graphs read and write it in place; nothing crosses
    to the host during decoding.

    Lookahead rows are not moved (that needs a device copy): ``keeps_rows`` is False and the generator feeds
    the chosen token once more instead, which overwrites the scratch rows.
    """

    def __init__(self, num_layers: int, capacity: int, kv_heads: int, head_dim: int, in_place: bool,
                 device: str = "cuda", device_id: int = 0, dtype=np.float32):
        shape = self.layer_shape(capacity, kv_heads, head_dim, in_place)
        alloc = ort.OrtValue.ortvalue_from_shape_and_type
        self._keys = [alloc(list(shape), dtype, device, device_id) for _ in range(num_layers)]
        self._values = [alloc(list(shape), dtype, device, device_id) for _ in range(num_layers)]
        super().__init__(capacity, shape, in_place, np.dtype(dtype).type,
                         ort.OrtDevice.make(device, device_id)._get_c_device(),
                         [k.data_ptr() for k in self._keys], [v.data_ptr() for v in self._values])

    def compact(self, slots: np.ndarray) -> None:
        """KVCache.compact, through a host copy of each layer (a Batch compacts rarely: when a step would not fit)."""
        axis = 2 if self.in_place else 1
        for buf in (*self._keys, *self._values):
            host = buf.numpy()
            moved = np.take(host, slots, axis=axis)
            index = [slice(None)] * host.ndim
            index[axis] = slice(0, len(slots))
            host[tuple(index)] = moved
            buf.update_inplace(host)
        self.length = len(slots)

    def _host_buffers(self) -> tuple[np.ndarray, np.ndarray]:  # copies every layer to the host
        return np.stack([k.numpy() for k in self._keys]), np.stack([v.numpy() for v in self._values])
