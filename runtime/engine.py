"""Runs the artifact's graphs: vision, embed, the decoder blocks in order, and the head.

Blocks are called through IOBinding: the past K/V are bound as views into the preallocated cache and the
new K/V outputs are bound straight into the cache slots after them, so a decode step allocates nothing but
the small hidden-state buffers. The cache lives in host memory for the CPU provider and in device memory
for CUDA / TensorRT (kv_cache.DeviceKVCache), where the K/V never cross to the host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort

from . import manifest as m
from .errors import ArtifactError, ConfigError
from .kv_cache import HOST, DeviceKVCache, KVCache, Span
from .sessions import CPU, SessionConfig, open_session
from .trt_profiles import profile_options

log = logging.getLogger("safesteer.runtime")

_ORT_TYPES = {np.dtype(np.float32): np.float32, np.dtype(np.int64): np.int64, np.dtype(np.float16): np.float16}


KV_CACHE_CHOICES = ("auto", "host", "device")


# Binding goes straight to the C++ IOBinding (ort.IOBinding's Python wrapper builds a device object and
# bookkeeping per call: ~1 ms per decode step over a 4-layer-block artifact's ~120 bindings).
def _where(name: str, x) -> tuple:
    if type(x) is Span:  # the KV cache's spans are already in binding form
        return x
    assert x.flags.c_contiguous, name
    return HOST, _ORT_TYPES[x.dtype], list(x.shape), x.ctypes.data


def _bind_in(io: ort.IOBinding, name: str, x) -> None:
    io._iobinding.bind_input(name, *_where(name, x))


def _bind_out(io: ort.IOBinding, name: str, x) -> None:
    io._iobinding.bind_output(name, *_where(name, x))


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


def _kv_row(manifest: m.Manifest) -> tuple[int, ...]:
    """One cached position's K (or V) shape: [kv_heads * head_dim] since safesteer 0.4, whose blocks are opset 23
    (the same release); [kv_heads, head_dim] in the opset-17 artifacts before it."""
    s = manifest.sizes
    return (s.num_kv_heads * s.head_dim,) if manifest.export.opset >= 23 else (s.num_kv_heads, s.head_dim)


class Engine:
    def __init__(self, root: Path, manifest: m.Manifest, cfg: SessionConfig, kv_cache: str = "auto"):
        if kv_cache not in KV_CACHE_CHOICES:
            raise ConfigError(f"kv_cache must be one of {KV_CACHE_CHOICES}, got {kv_cache!r}")
        self.manifest = manifest
        self.sizes = manifest.sizes

        self._kv_row = _kv_row(manifest)
        # The context the sessions can serve: TensorRT engines are built for shapes up to trt_max_tokens
        limit = self.sizes.max_positions
        self.context_limit = min(limit, cfg.trt_max_tokens) if cfg.uses_tensorrt else limit
        blocks = sorted(manifest.graphs_of(m.ROLE_BLOCK), key=lambda e: e.first_layer)
        vision = manifest.graphs_of(m.ROLE_VISION)[:1]
        order = [*vision, manifest.graphs_of(m.ROLE_EMBED)[0], *blocks, manifest.graphs_of(m.ROLE_HEAD)[0]]
        started = time.perf_counter()
        sessions = [self._open(root, cfg, entry, i, len(order), started) for i, entry in enumerate(order)]
        self.vision = sessions.pop(0) if vision else None
        self.embed, *block_sessions, self.head = sessions
        self.blocks = [Block(e, session) for e, session in zip(blocks, block_sessions)]
        self.has_probe = any(b.has_probe for b in self.blocks)
        on_gpu = self.blocks[0].session.get_providers()[0] != CPU
        # "device" on the CPU provider: onnxruntime-allocated buffers, the same code path as CUDA (tests use it)
        self.kv_device = {"auto": "cuda" if on_gpu else None, "host": None,
                          "device": "cuda" if on_gpu else "cpu"}[kv_cache]

    def _open(self, root: Path, cfg: SessionConfig, entry: m.GraphEntry, i: int, count: int,
              started: float) -> ort.InferenceSession:
        profiles = None
        if cfg.uses_tensorrt:  # engine builds take minutes: say where we are
            log.info("TensorRT: engine for %s (graph %d of %d, %.0f s so far); a first build takes minutes, later "
                     "loads come from the engine cache", entry.file.path, i + 1, count, time.perf_counter() - started)
            profiles = profile_options(list(entry.inputs), self.sizes.hidden_size, self._kv_row, self.context_limit)
        return open_session(root / entry.file.path, cfg, profiles)

    def providers(self) -> dict[str, str]:
        """Which execution provider each graph's session got (the first one it will use)."""
        sessions = {"embed": self.embed, "head": self.head}
        if self.vision is not None:
            sessions["vision"] = self.vision
        sessions.update({f"block_{b.entry.first_layer:02d}": b.session for b in self.blocks})
        return {name: s.get_providers()[0] for name, s in sessions.items()}

    def new_cache(self, capacity: int) -> KVCache | DeviceKVCache:
        if self.kv_device is None:
            return KVCache(self.sizes.num_layers, capacity, self._kv_row)
        return DeviceKVCache(self.sizes.num_layers, capacity, self._kv_row, self.kv_device)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        (features,) = self.vision.run([m.IMAGE_FEATURES], {m.PIXEL_VALUES: pixel_values})
        return features

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        (embeds,) = self.embed.run([m.INPUTS_EMBEDS], {m.INPUT_IDS: ids})
        return embeds

    def forward(self, hidden: np.ndarray, mask: np.ndarray, cache: KVCache | DeviceKVCache,
                safety: Optional[dict[str, np.ndarray]] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Run every block over ``hidden`` [1, rows, H]; new K/V land in the cache slots after ``cache.length``.

        The cache length is not advanced: the caller commits the rows it keeps. Returns the last hidden
        state and, when the artifact has a probe block, ``harm_logit`` [1, rows].
        """
        rows = hidden.shape[1]
        positions = np.arange(cache.length, cache.length + rows, dtype=np.int64)[None]
        return self.forward_at(hidden, mask, positions, cache, safety)

    def forward_at(self, hidden: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: KVCache | DeviceKVCache,
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
