"""Runs the artifact's graphs: vision, embed, the decoder blocks in order, and the head.

Blocks are called through IOBinding over host memory: the past K/V are bound as views into the
preallocated cache and the new K/V outputs are bound straight into the cache slots after them, so a
decode step allocates nothing but the small hidden-state buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as C

from . import manifest as m
from .errors import ArtifactError
from .kv_cache import KVCache
from .sessions import SessionConfig, open_session

_ORT_TYPES = {np.dtype(np.float32): np.float32, np.dtype(np.int64): np.int64, np.dtype(np.float16): np.float16}


_CPU = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)


# Binding goes straight to the C++ IOBinding (ort.IOBinding's Python wrapper builds a device object and
# bookkeeping per call: ~1 ms per decode step over a 4-layer-block artifact's ~120 bindings).
def _bind_in(io: ort.IOBinding, name: str, array: np.ndarray) -> None:
    assert array.flags.c_contiguous, name
    io._iobinding.bind_input(name, _CPU, _ORT_TYPES[array.dtype], list(array.shape), array.ctypes.data)


def _bind_out(io: ort.IOBinding, name: str, array: np.ndarray) -> None:
    assert array.flags.c_contiguous, name
    io._iobinding.bind_output(name, _CPU, _ORT_TYPES[array.dtype], list(array.shape), array.ctypes.data)


@dataclass
class Block:
    entry: m.GraphEntry
    session: ort.InferenceSession

    @property
    def layers(self) -> range:
        return range(self.entry.first_layer, self.entry.first_layer + self.entry.num_layers)

    @cached_property
    def extra_inputs(self) -> list[str]:
        return [n for n in self.entry.inputs if n in m.PROBE_INPUTS or n in m.MSAV_INPUTS]

    @cached_property
    def io(self) -> ort.IOBinding:
        """One binding per block, rebound each call (every name is bound again, so nothing stale stays)."""
        return self.session.io_binding()

    @cached_property
    def has_probe(self) -> bool:
        return m.HARM_LOGIT in self.entry.outputs


class Engine:
    def __init__(self, root: Path, manifest: m.Manifest, cfg: SessionConfig):
        self.manifest = manifest
        self.sizes = manifest.sizes

        def load(entry: m.GraphEntry) -> ort.InferenceSession:
            return open_session(root / entry.file.path, cfg)

        vision = manifest.graphs_of(m.ROLE_VISION)
        self.vision = load(vision[0]) if vision else None
        self.embed = load(manifest.graphs_of(m.ROLE_EMBED)[0])
        self.blocks = [Block(e, load(e)) for e in sorted(manifest.graphs_of(m.ROLE_BLOCK), key=lambda e: e.first_layer)]
        self.head = load(manifest.graphs_of(m.ROLE_HEAD)[0])
        self.has_probe = any(b.has_probe for b in self.blocks)
        first = self.blocks[0].session.get_inputs()
        rank = next(len(i.shape) for i in first if i.name == m.past_key(self.blocks[0].entry.first_layer))
        s = self.sizes  # K/V rows are [kv_heads * head_dim]; artifacts before 0.4 used [kv_heads, head_dim]
        self._kv_row = (s.num_kv_heads * s.head_dim,) if rank == 3 else (s.num_kv_heads, s.head_dim)

    def providers(self) -> dict[str, str]:
        """Which execution provider each graph's session got (the first one it will use)."""
        sessions = {"embed": self.embed, "head": self.head}
        if self.vision is not None:
            sessions["vision"] = self.vision
        sessions.update({f"block_{b.entry.first_layer:02d}": b.session for b in self.blocks})
        return {name: s.get_providers()[0] for name, s in sessions.items()}

    def new_cache(self, capacity: int) -> KVCache:
        s = self.sizes
        return KVCache(s.num_layers, capacity, self._kv_row)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        (features,) = self.vision.run([m.IMAGE_FEATURES], {m.PIXEL_VALUES: pixel_values})
        return features

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        (embeds,) = self.embed.run([m.INPUTS_EMBEDS], {m.INPUT_IDS: ids})
        return embeds

    def forward(self, hidden: np.ndarray, mask: np.ndarray, cache: KVCache,
                safety: Optional[dict[str, np.ndarray]] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Run every block over ``hidden`` [1, rows, H]; new K/V land in the cache slots after ``cache.length``.

        The cache length is not advanced: the caller commits the rows it keeps. Returns the last hidden
        state and, when the artifact has a probe block, ``harm_logit`` [1, rows].
        """
        rows = hidden.shape[1]
        positions = np.arange(cache.length, cache.length + rows, dtype=np.int64)[None]
        return self.forward_at(hidden, mask, positions, cache, safety)

    def forward_at(self, hidden: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: KVCache,
                   safety: Optional[dict[str, np.ndarray]] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """``safety``: the SafeSteer inputs (vectors, knobs, msav_mask) for the blocks that take them."""
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        mask = np.ascontiguousarray(mask)
        rows = hidden.shape[1]
        harm_logit = None
        for block in self.blocks:
            io = block.io
            _bind_in(io, m.HIDDEN_IN, hidden)
            _bind_in(io, m.ATTENTION_MASK, mask)
            _bind_in(io, m.POSITION_IDS, positions)
            out = np.empty_like(hidden)
            _bind_out(io, m.HIDDEN_OUT, out)
            for name in block.extra_inputs:
                if safety is None or name not in safety:
                    raise ArtifactError(f"{block.entry.file.path} needs the SafeSteer input {name}")
                _bind_in(io, name, np.ascontiguousarray(safety[name]))
            if block.has_probe:
                harm_logit = np.empty((1, rows), np.float32)
                _bind_out(io, m.HARM_LOGIT, harm_logit)
            for layer in block.layers:
                past_k, past_v = cache.past(layer)
                new_k, new_v = cache.slot(layer, rows)
                _bind_in(io, m.past_key(layer), past_k)
                _bind_in(io, m.past_value(layer), past_v)
                _bind_out(io, m.new_key(layer), new_k)
                _bind_out(io, m.new_value(layer), new_v)
            block.session.run_with_iobinding(io)
            hidden = out
        return hidden, harm_logit

    def logits(self, hidden: np.ndarray, top_k: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head over ``hidden`` [1, rows, H] -> (logits, top-k log-probs, top-k ids)."""
        return tuple(self.head.run(None, {m.HIDDEN_IN: hidden, m.TOP_K: np.array([top_k], dtype=np.int64)}))
