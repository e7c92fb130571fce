"""Runs the artifact's graphs: vision and embed (models with images), then the decoder blocks in order; the first
block of a text-only model embeds the ids itself and the last block ends in the LM head, so a text-only artifact in
one block is one graph call per step.

Blocks are called through IOBinding over a preallocated cache (kv_cache.py). Default exports keep it in place: each
layer's K and V buffers are bound once as both input and output, and GroupQueryAttention writes the new rows itself.
Standard-ops exports get the past bound as views into the cache and their new K/V outputs bound straight into the
slots after it. Decoding steps write their outputs (hidden states between blocks, logits, top-k, probe logit) into
buffers the engine keeps per shape, bound once too, so such a step allocates and rebinds almost nothing. The cache
lives in host memory for the CPU provider and in device memory for CUDA / TensorRT (kv_cache.DeviceKVCache), where the
K/V never cross to the host.
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

from . import huge_pages
from . import manifest as m
from .errors import ArtifactError, ConfigError
from .kv_cache import HOST, DeviceKVCache, KVCache, Span
from .masks import windowed
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


def _check_io(entry: m.GraphEntry, session: ort.InferenceSession) -> None:
    """The manifest's inputs / outputs for a graph are the graph's own, and a block's layers name its K/V inputs."""
    ins, outs = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
    problem = None
    if set(entry.inputs) != ins or set(entry.outputs) != outs:
        problem = "lists other inputs or outputs than the graph has"
    elif entry.role == m.ROLE_BLOCK and not {m.past_key(i) for i in range(entry.first_layer,
                                                                          entry.first_layer + entry.num_layers)} <= ins:
        problem = f"gives it layers {entry.first_layer}..{entry.first_layer + entry.num_layers - 1}, not the graph's"
    if problem:
        raise ArtifactError(f"the manifest {problem} for {entry.file.path}; re-export the artifact")


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

    cache: object = None  # the in-place KV cache whose buffers are bound to io (bound once, not per call)

    @cached_property
    def io(self) -> ort.IOBinding:
        """One binding per block. A name is bound again only when its array changes (``bind``); an in-place cache's
        buffers only when the cache does (``cache``)."""
        return self.session.io_binding()

    @cached_property
    def bound(self) -> dict[str, np.ndarray]:
        return {}

    def bind(self, name: str, x: np.ndarray, output: bool = False) -> None:
        """Bind input (or ``output``) ``name`` to ``x``, skipping the call when ``x`` is what it holds (a request's
        SafeSteer inputs, the head's knobs and an engine's scratch outputs stay the same over its steps; a cold bind
        costs ~10 us)."""
        if self.bound.get(name) is not x:
            try:
                (_bind_out if output else _bind_in)(self.io, name, x)
            except RuntimeError as exc:  # a name the graph does not have: the manifest and the graph disagree
                raise ArtifactError(f"{self.entry.file.path}: {exc}; the manifest does not match the graph "
                                    "(re-export the artifact)") from None
            self.bound[name] = x

    @cached_property
    def full(self) -> bool:
        """Some of its layers attend fully (they read ATTENTION_MASK)."""
        return m.ATTENTION_MASK in self.entry.inputs

    @cached_property
    def sliding(self) -> bool:
        """Some of its layers use a sliding window (they read SLIDING_MASK)."""
        return m.SLIDING_MASK in self.entry.inputs

    @cached_property
    def has_probe(self) -> bool:
        return m.HARM_LOGIT in self.entry.outputs


@dataclass
class StepOut:
    """What one model call returns for the rows its LM head ran on."""

    logits: np.ndarray  # [1, head_rows, vocab]
    top_logprobs: np.ndarray  # [1, head_rows, top_k], log-softmax values, best first
    top_ids: np.ndarray  # [1, head_rows, top_k]
    harm_logit: Optional[np.ndarray] = None  # [1, rows]: the probe's logit at every row (artifacts with a probe)

    def row(self, i: int) -> "StepOut":
        """Row ``i`` of the head's rows, as a one-row StepOut (harm_logit: that row's, when head_rows covered all)."""
        harm = None if self.harm_logit is None else self.harm_logit[:, i : i + 1]
        return StepOut(self.logits[:, i : i + 1], self.top_logprobs[:, i : i + 1], self.top_ids[:, i : i + 1], harm)


class Engine:
    def __init__(self, root: Path, manifest: m.Manifest, cfg: SessionConfig, kv_cache: str = "auto"):
        if kv_cache not in KV_CACHE_CHOICES:
            raise ConfigError(f"kv_cache must be one of {KV_CACHE_CHOICES}, got {kv_cache!r}")
        self.manifest = manifest
        self.sizes = manifest.sizes

        # The context the sessions can serve: TensorRT engines are built for shapes up to trt_max_tokens
        limit = self.sizes.max_positions
        self.context_limit = min(limit, cfg.trt_max_tokens) if cfg.uses_tensorrt else limit
        problem = m.layout_problem(manifest)
        if problem:
            raise ArtifactError(f"cannot run this artifact: {problem}")
        blocks = sorted(manifest.graphs_of(m.ROLE_BLOCK), key=lambda e: e.first_layer)
        self.in_place = m.in_place_cache(manifest)
        vision = manifest.graphs_of(m.ROLE_VISION)[:1]
        embed = manifest.graphs_of(m.ROLE_EMBED)[:1]
        order = [*vision, *embed, *blocks]
        started = time.perf_counter()
        memory_before = huge_pages.resident() if cfg.huge_pages and huge_pages.available() else None
        sessions = [self._open(root, cfg, entry, i, len(order), started) for i, entry in enumerate(order)]
        for entry, session in zip(order, sessions):
            _check_io(entry, session)
        self.vision = sessions.pop(0) if vision else None
        self.embed = sessions.pop(0) if embed else None
        self.blocks = [Block(e, session) for e, session in zip(blocks, sessions)]
        self.has_probe = any(b.has_probe for b in self.blocks)
        self.embeds_in_block = m.INPUT_IDS in blocks[0].inputs
        self._constants: dict[tuple[str, int], np.ndarray] = {}
        self._scratch: dict[tuple, tuple[StepOut, list[np.ndarray]]] = {}  # step's scratch outputs, by shape
        on_gpu = self.blocks[0].session.get_providers()[0] != CPU
        self.huge_pages = huge_pages.Collapsed()  # what moved onto huge pages (the weights the CPU streams)
        if memory_before is not None and not on_gpu:
            self.huge_pages = huge_pages.collapse_filled(memory_before)
            log.info("huge pages: %.0f MB of weights moved in %.1f s", self.huge_pages.bytes / 2**20,
                     self.huge_pages.seconds)
        # "device" on the CPU provider: onnxruntime-allocated buffers, the same code path as CUDA (tests use it)
        self.kv_device = {"auto": "cuda" if on_gpu else None, "host": None,
                          "device": "cuda" if on_gpu else "cpu"}[kv_cache]

    def _open(self, root: Path, cfg: SessionConfig, entry: m.GraphEntry, i: int, count: int,
              started: float) -> ort.InferenceSession:
        profiles = None
        if cfg.uses_tensorrt:  # engine builds take minutes: say where we are
            log.info("TensorRT: engine for %s (graph %d of %d, %.0f s so far); a first build takes minutes, later "
                     "loads come from the engine cache", entry.file.path, i + 1, count, time.perf_counter() - started)
            kv_row = (self.sizes.num_kv_heads * self.sizes.head_dim,)  # standard-ops layout (resolve_providers)
            profiles = profile_options(list(entry.inputs), self.sizes.hidden_size, kv_row, self.context_limit,
                                       mrope=bool(self.sizes.mrope_sections))
        return open_session(root / entry.file.path, cfg, profiles)

    def _constant(self, kind: str, value: int) -> np.ndarray:
        """One array per (kind, value), reused across calls so that the blocks need not bind it again."""
        return self._constants.setdefault((kind, value), np.array([value], np.int64))

    def _outputs(self, rows: int, heads: int, top_k: int, scratch: bool) -> tuple[StepOut, list[np.ndarray]]:
        """The call's StepOut and the hidden state each block but the last writes ([1, rows, H] each): new arrays,
        or with ``scratch`` the engine's own for this shape, reused by every scratch call (still bound, and memory
        that is already paged in: a fresh 600 KB logits array cost ~0.25 ms of page faults per step)."""
        key = (rows, heads, top_k)
        if scratch and key in self._scratch:
            return self._scratch[key]
        out = StepOut(np.empty((1, heads, self.sizes.vocab_size), np.float32), np.empty((1, heads, top_k), np.float32),
                      np.empty((1, heads, top_k), np.int64),
                      np.empty((1, rows), np.float32) if self.has_probe else None)
        hidden = [np.empty((1, rows, self.sizes.hidden_size), np.float32) for _ in self.blocks[1:]]
        if scratch:
            self._scratch[key] = out, hidden
        return out, hidden

    def providers(self) -> dict[str, str]:
        """Which execution provider each graph's session got (the first one it will use)."""
        sessions = {"embed": self.embed, "vision": self.vision}
        sessions.update({f"block_{b.entry.first_layer:02d}": b.session for b in self.blocks})
        return {name: s.get_providers()[0] for name, s in sessions.items() if s is not None}

    def new_cache(self, capacity: int) -> KVCache | DeviceKVCache:
        s = self.sizes
        if self.kv_device is None:
            return KVCache(s.num_layers, capacity, s.num_kv_heads, s.head_dim, self.in_place)
        return DeviceKVCache(s.num_layers, capacity, s.num_kv_heads, s.head_dim, self.in_place, self.kv_device)

    def run_vision(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The vision graph's outputs by name: IMAGE_FEATURES [calls, tokens, hidden] (and IMAGE_NEWLINE);
        ``feeds`` from image_tokens.vision_inputs."""
        names = [o.name for o in self.vision.get_outputs()]
        return dict(zip(names, self.vision.run(names, feeds)))

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings [1, rows, H] from the embed graph (artifacts with images: features are merged into them)."""
        (embeds,) = self.embed.run([m.INPUTS_EMBEDS], {m.INPUT_IDS: ids})
        return embeds

    def step(self, cache: KVCache | DeviceKVCache, mask: np.ndarray, positions: np.ndarray, *,
             ids: Optional[np.ndarray] = None, embeds: Optional[np.ndarray] = None,
             head_rows: Optional[np.ndarray] = None, top_k: int = 1,
             safety: Optional[dict[str, np.ndarray]] = None, rope_positions: Optional[np.ndarray] = None,
             scratch: bool = False, sliding: Optional[np.ndarray] = None) -> StepOut:
        """Run the model over this call's rows: ``ids`` [1, rows] or, for artifacts with an embed graph, ``embeds``
        [1, rows, H] (image features merged in). New K/V land in the cache slots after ``cache.length``, which is
        not advanced: the caller commits the rows it keeps. The LM head runs on ``head_rows`` (default: the last
        row); ``safety``: the SafeSteer inputs (vectors, knobs, msav_mask) for the blocks that take them.
        ``positions`` [1, rows]: the rows' places in the sequence (sliding masks); ``rope_positions``: what the
        blocks rotate by when it differs — multimodal RoPE's [3, 1, rows] (default: ``positions`` on every row).
        ``scratch``: write into the engine's reused buffers for this shape, so the StepOut is overwritten by the next
        scratch call (decoding: the caller is done with the previous step's by then). ``sliding``: the sliding-window
        layers' mask when the caller built it (a Batch, whose cache slots are not the rows' positions); default:
        ``mask`` windowed by ``positions``."""
        if embeds is None:
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            first = ids if self.embeds_in_block else self.embed_ids(ids)
        elif self.embeds_in_block:
            raise ArtifactError("this artifact embeds token ids inside its first block; pass ids, not embeddings")
        else:
            first = np.ascontiguousarray(embeds, dtype=np.float32)
        rows = first.shape[1]
        if head_rows is None:  # the last row; a decoding step's (row 0) is one array, so it stays bound
            head_rows = self._constant("head row", 0) if rows == 1 else np.array([rows - 1], np.int64)
        head_rows = np.ascontiguousarray(head_rows, np.int64)
        mask = np.ascontiguousarray(mask)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if sliding is None and self.sizes.sliding_window:
            sliding = windowed(mask, positions, self.sizes.sliding_window)
        if rope_positions is None and self.sizes.mrope_sections:
            rope_positions = np.broadcast_to(positions, (3, *positions.shape))
        rope_positions = positions if rope_positions is None else np.ascontiguousarray(rope_positions, np.int64)
        top = self._constant("top_k", top_k)
        cache.check_room(rows)
        out, hidden_out = self._outputs(rows, len(head_rows), top_k, scratch)
        for i, block in enumerate(self.blocks):
            io = block.io
            block.bind(m.INPUT_IDS if first.dtype == np.int64 else m.HIDDEN_IN, first)
            if block.full:
                block.bind(m.ATTENTION_MASK, mask)
            if block.sliding:
                block.bind(m.SLIDING_MASK, sliding)
            block.bind(m.POSITION_IDS, rope_positions)
            for name in block.extra_inputs:
                if safety is None or name not in safety:
                    raise ArtifactError(f"{block.entry.file.path} needs the SafeSteer input {name}")
                block.bind(name, safety[name])  # safety.static_feeds and the callers' msav rows: contiguous arrays
            if block.has_probe:
                block.bind(m.HARM_LOGIT, out.harm_logit, output=True)
            if not self.in_place:
                for layer in block.layers:
                    past_k, past_v = cache.past(layer)
                    new_k, new_v = cache.slot(layer, rows)
                    block.bind(m.past_key(layer), past_k)
                    block.bind(m.past_value(layer), past_v)
                    _bind_out(io, m.new_key(layer), new_k)
                    _bind_out(io, m.new_value(layer), new_v)
            elif block.cache is not cache:
                for layer in block.layers:
                    keys, values = cache.buffers(layer)
                    block.bind(m.past_key(layer), keys)
                    _bind_out(io, m.present_key(layer), keys)
                    block.bind(m.past_value(layer), values)
                    _bind_out(io, m.present_value(layer), values)
                block.cache = cache
            hidden = None
            if block is self.blocks[-1]:
                block.bind(m.HEAD_ROWS, head_rows)
                block.bind(m.TOP_K, top)
                block.bind(m.LOGITS, out.logits, output=True)
                block.bind(m.TOPK_LOGPROBS, out.top_logprobs, output=True)
                block.bind(m.TOPK_IDS, out.top_ids, output=True)
            else:
                hidden = hidden_out[i]
                block.bind(m.HIDDEN_OUT, hidden, output=True)
            try:
                block.session.run_with_iobinding(io)
            except Exception as exc:  # onnxruntime's own exception types
                raise ArtifactError(f"onnxruntime failed running {block.entry.file.path} ({exc}); the artifact may be "
                                    "damaged (re-export it) or the request too large for this machine") from exc
            first = hidden
        return out
