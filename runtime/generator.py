"""``Generator``: prompt -> KV-cached decode loop over the artifact's graphs -> text.

One Generator serves one request at a time (it reuses its KV cache buffers): a second request while one is being
served — from another thread, or while a stream() is still open — is refused at once with BusyError, never run
over the first one's cache.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from . import manifest as m
from .engine import Engine, StepOut
from .errors import BusyError, ConfigError, ImageError, InputError, PromptTooLongError
from .image_tokens import expand_ids, expand_text, image_rows, image_runs, vision_inputs
from .images import DEFAULT_LIMITS, ImageLike, ImageLimits, PreparedImage, prepare
from .kv_cache import DeviceKVCache, KVCache
from .masks import both_ways, causal_mask, tree_mask
from .qwen_vl import mrope_positions
from .sampling import Sampler, SamplingConfig
from .safety import SafetyConfig, load_vectors, score, select, sigmoid, static_feeds
from .safety import resolve as resolve_safety
from .sessions import Providers, SessionConfig, resolve_providers, use_shared_pool
from .text import ChatTemplate, IncrementalDecoder, TextCodec, load_chat_template, render_messages

log = logging.getLogger("safesteer.runtime")


@dataclass
class Timings:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # request start -> first token chosen (time to first token)
    decode_s: float = 0.0  # first token -> last token

    @property
    def ms_per_token(self) -> float:
        steps = self.new_tokens - 1
        return 1000.0 * self.decode_s / steps if steps > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "time_to_first_token_s": self.prefill_s, "decode_s": self.decode_s,
                "ms_per_token": self.ms_per_token, "tokens_per_s": self.tokens_per_s}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only (an EOS that ended generation included)
    finish_reason: str  # "eos" | "length" | "stop"
    timings: Timings
    prompt_ids: list[int] = field(default_factory=list)
    safety_trace: list[dict[str, Any]] = field(default_factory=list)  # per-step SafeSteer telemetry
    prompt_score: Optional[float] = None  # probe score at the last prompt position (artifacts with a probe)


@dataclass
class _Request:
    ids: list[int]
    images: list[PreparedImage]  # in prompt order


@dataclass
class _Decode:
    """One request's decoding state; the Generator itself keeps only buffers that requests reuse."""

    cache: KVCache | DeviceKVCache
    feeds: Optional[dict[str, np.ndarray]]  # SafeSteer's graph inputs (None: an artifact without a probe)
    msav_on: bool = False  # the request has an image and the artifact an MSAV: generated tokens get it too
    top_k: int = 1  # TopK candidates per step: the request's SafeSteer k (1 with SafeSteer off)
    rope_offset: int = 0  # multimodal RoPE: what positions after the prompt add (the request's rope delta)
    msav_one: np.ndarray = field(init=False)  # the MSAV mask of one generated row
    open_row: np.ndarray = field(init=False)  # zeros [1, 1, 1, capacity]: a fed token's causal mask is a view
    one_id: np.ndarray = field(init=False)  # the fed token and its position, refilled each step (stay bound)
    one_position: np.ndarray = field(init=False)

    def __post_init__(self):
        self.msav_one = np.full((1, 1), 1.0 if self.msav_on else 0.0, np.float32)
        self.open_row = np.zeros((1, 1, 1, self.cache.capacity), np.float32)
        self.one_id, self.one_position = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)


@dataclass
class Call:
    """One model call a request's decoding asks for (Engine.step's arguments), in the request's own positions:
    ``mask`` [1, 1, rows, d.cache.length + rows] over its committed past and these rows. The Generator runs it
    on the request's own cache; a Batch (batch.py) runs the calls of many requests as one."""

    d: _Decode
    mask: np.ndarray
    positions: np.ndarray  # [1, rows]
    ids: Optional[np.ndarray]  # [1, rows] int64, or None with embeds
    embeds: Optional[np.ndarray]  # [1, rows, H]
    head_rows: Optional[np.ndarray]  # None: the last row
    feeds: Optional[dict[str, np.ndarray]]  # SafeSteer inputs, msav_mask included
    rope_positions: Optional[np.ndarray]
    scratch: bool = False
    prefill: bool = False  # the prompt's rows (a Batch may run them in chunks)

    @property
    def rows(self) -> int:
        return self.positions.shape[1]


def trt_cache_dir(root: Path) -> Path:
    """Where TensorRT engines for this artifact are cached by default: under the user's cache directory, keyed by
    the manifest's sha256 (never inside the artifact, which may come from someone else)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "safesteer" / "trt" / m.sha256_of(root / m.MANIFEST_NAME)[:16]


def _no_unknown(unknown: dict) -> None:
    """A keyword generate() / stream() does not take is a ConfigError (a typo'd knob, a field passed straight from a
    request), not Python's TypeError."""
    if unknown:
        raise ConfigError(f"unknown argument(s) {sorted(unknown)}; generate() takes messages / prompt / prompt_ids, "
                          "images, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, seed, stop, "
                          "safety, sampling")


def _last(iterator):
    """Runs ``iterator`` to its end -> its return value (what it yields on the way is dropped)."""
    while True:
        try:
            next(iterator)
        except StopIteration as done:
            return done.value


def _checked_lengths(max_new_tokens, min_new_tokens, stop) -> list[str]:
    """Validates the length knobs and stop strings; -> the non-empty stop strings."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or isinstance(min_new_tokens, bool) or min_new_tokens < 0:
        raise ConfigError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    if isinstance(stop, str) or not (stop is None or isinstance(stop, (list, tuple))):
        raise ConfigError("stop must be a list of strings, e.g. stop=['\\n\\n']")
    if stop and not all(isinstance(s, str) for s in stop):
        raise ConfigError(f"stop must hold strings only, got {[s for s in stop if not isinstance(s, str)][:3]!r}")
    return [s for s in (stop or []) if s]


class _Reply:
    """The reply's text as tokens arrive: cut at the first stop string, released in pieces that never end inside
    what could still become one (the last ``hold`` characters wait)."""

    def __init__(self, codec: TextCodec, stops: list[str]):
        self.decoder, self.stops = IncrementalDecoder(codec), stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.emitted = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """-> (the text that is now safe to show, whether a stop string ended the reply)."""
        self.text += self.decoder.push(token)
        hit = min((i for i in (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stops) if i >= 0),
                  default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            return "", True
        if len(self.text) - self.hold <= self.emitted:
            return "", False
        piece = self.text[self.emitted : len(self.text) - self.hold]
        self.emitted = len(self.text) - self.hold
        return piece, False

    def finish(self, whole: Optional[str] = None) -> tuple[str, str]:
        """-> (the whole text, what has not been shown yet). ``whole``: the reply decoded in one go, which also holds
        the bytes of a character the last token left incomplete (the incremental decoder waits for the rest)."""
        if whole is not None and whole.startswith(self.text):
            self.text = whole
        rest = self.text[self.emitted :]
        self.emitted = len(self.text)
        return self.text, rest


class Generator:
    """Loads an artifact made by ``safesteer-export`` and generates text with onnxruntime.

    ``providers``: "auto" (TensorRT, CUDA, CPU: those this onnxruntime has) or a list of provider names.
    ``threads``: intra-op threads (0 = onnxruntime's default). ``thread_pool``: "per-graph" (each graph's session
    its own pool), "shared" (onnxruntime's process-wide pool for all: 1-4% faster with multi-block artifacts on the
    CPU, but from then on every onnxruntime session in the process must use it) or "auto" (shared if this process
    has that pool, else per-graph); see sessions.use_shared_pool. ``engine_cache_dir``: TensorRT engine
    and timing caches (default: trt_cache_dir(), in the user cache). ``kv_cache``: "auto" (device memory when the
    blocks run on CUDA / TensorRT, else host), "host" or "device". ``trt_max_tokens``: the context (prompt +
    new tokens) the TensorRT engines are built for; longer requests are refused (other providers: the model's).
    ``huge_pages``: on the CPU, move the weights onnxruntime loaded onto 2 MB pages (Linux 6.1+, see
    huge_pages.py): in paired runs on this VM 5% (fp32), 13% (int8), 11-21% (int4) more tokens/s, for a one-time
    copy at load. ``allow_control_tokens``: False (the default) spells control-token strings in message text
    ("<|im_end|>", "<|im_start|>system", image placeholders) out as plain text, so a user cannot forge turns or
    images; True keeps them control tokens (callers who write turns into content themselves). ``image_limits``:
    pixels, aspect ratio and count per request, and whether file paths are accepted (images.ImageLimits; a server
    passes ``ImageLimits(allow_paths=False)``), checked before any image is decoded. ``expected_sha256``: the
    sha256 of the artifact's manifest.json you expect (it pins every other file through their hashes); any other
    artifact is refused. TensorRT engines are cached outside the artifact by default (``trt_cache_dir``): an
    artifact cannot ship engines that get loaded.
    """

    def __init__(self, artifact_dir: str | Path, providers: Providers = "auto", *, threads: int = 0,
                 verify: bool = True, engine_cache_dir: Optional[str | Path] = None, kv_cache: str = "auto",
                 trt_max_tokens: int = 4096, thread_pool: str = "auto", huge_pages: bool = True,
                 allow_control_tokens: bool = False, image_limits: ImageLimits = DEFAULT_LIMITS,
                 expected_sha256: Optional[str] = None):
        root = Path(artifact_dir)
        manifest = m.load_manifest(root, verify_files=verify, expected_sha256=expected_sha256)
        cfg = SessionConfig(
            providers=resolve_providers(providers, m.in_place_cache(manifest)), intra_op_threads=threads,
            cache_dir=Path(engine_cache_dir) if engine_cache_dir else trt_cache_dir(root),
            trt_max_tokens=trt_max_tokens, huge_pages=huge_pages,
        )
        cfg = replace(cfg, shared_pool=use_shared_pool(thread_pool, cfg))
        if not isinstance(image_limits, ImageLimits):
            raise ConfigError(f"image_limits must be an ImageLimits, got {type(image_limits).__name__}")
        self._attach(root, manifest, Engine(root, manifest, cfg, kv_cache), allow_control_tokens, image_limits)
        self.providers = self.engine.providers()
        self.thread_pool = "shared" if cfg.shared_pool else "per-graph"  # what thread_pool resolved to
        self.huge_pages = self.engine.huge_pages  # bytes of weights moved onto huge pages, and the seconds it took
        log.info("execution providers per graph: %s; thread pool: %s", self.providers, self.thread_pool)

    @classmethod
    def around(cls, root: str | Path, manifest: m.Manifest, engine) -> "Generator":
        """A Generator driving ``engine`` (anything with Engine's ``step`` / ``new_cache`` / ``context_limit``) with
        the tokenizer, chat template and safety vectors in ``root``: the decode loop without onnxruntime sessions
        (tests/test_loop_scripted.py drives it with a scripted model)."""
        gen = cls.__new__(cls)
        gen._attach(Path(root), manifest, engine)
        return gen

    def _attach(self, root: Path, manifest: m.Manifest, engine, allow_control_tokens: bool = False,
                image_limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.root, self.manifest, self.engine = root, manifest, engine
        self.allow_control_tokens, self.image_limits = allow_control_tokens, image_limits
        self._busy = threading.Lock()  # held while a request uses the buffers below
        self.codec = TextCodec(root, manifest.tokenizer)
        self.chat: Optional[ChatTemplate] = load_chat_template(root, manifest.tokenizer)
        self._cache: Optional[KVCache | DeviceKVCache] = None
        info = manifest.safety
        self._vectors = load_vectors(root, info, manifest.sizes.hidden_size) if info else None

    # --- public API ----------------------------------------------------------------------------
    def generate(self, messages: Optional[Sequence[dict]] = None, *, prompt: Optional[str] = None,
                 prompt_ids: Optional[Sequence[int]] = None, images: Optional[Sequence[ImageLike]] = None,
                 max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                 safety: Any = "auto", min_new_tokens: int = 0,
                 sampling: Optional[SamplingConfig] = None, **unknown) -> GenerationResult:
        """``safety``: "auto" (SafeSteer with the artifact's defaults when it was calibrated, else off),
        True (the defaults; an error without calibration), False, or a SafetyConfig. ``sampling``: a SamplingConfig
        instead of the flat do_sample / temperature / top_k / top_p / seed keywords (not both).
        ``min_new_tokens``: end-of-sequence tokens are not chosen before this many tokens (benchmarks)."""
        _no_unknown(unknown)
        run = self._run(messages, prompt=prompt, prompt_ids=prompt_ids, images=images,
                        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, stop=stop, safety=safety, min_new_tokens=min_new_tokens,
                        sampling=sampling, pieces=False)
        return _last(run)

    def stream(self, messages: Optional[Sequence[dict]] = None, *, prompt: Optional[str] = None,
               prompt_ids: Optional[Sequence[int]] = None, images: Optional[Sequence[ImageLike]] = None,
               max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
               safety: Any = "auto", min_new_tokens: int = 0,
               sampling: Optional[SamplingConfig] = None, **unknown) -> Iterator[str]:
        """Like ``generate`` (the same arguments) but yields text pieces as they decode; the GenerationResult is
        the generator's return value (``StopIteration.value``)."""
        _no_unknown(unknown)
        return (yield from self._run(messages, prompt=prompt, prompt_ids=prompt_ids, images=images,
                                     max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed, stop=stop, safety=safety,
                                     min_new_tokens=min_new_tokens, sampling=sampling, pieces=True))

    def token_logprobs(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced log-probability of each token after the first, in one pass (SafeSteer off):
        [len(prompt_ids) - 1]. For perplexity checks; not a generation."""
        ids = np.asarray(prompt_ids, np.int64)[None]
        n = ids.shape[1]
        if n < 2 or n > self.engine.context_limit:
            raise InputError(f"token_logprobs needs 2 to {self.engine.context_limit} tokens, got {n}")
        with self._serving():
            d = _Decode(self._cache_for(n), self._safety_feeds(None))
            out = _last(self._drive(self._run_rows(d, ids, causal_mask(0, n), np.arange(n, dtype=np.int64)[None],
                                                   np.zeros((1, n), np.float32), head_rows=np.arange(n - 1))))
        logits = out.logits[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return logp[np.arange(n - 1), ids[0, 1:]]

    # --- request preparation -----------------------------------------------------------------
    def _prepare(self, messages, prompt, prompt_ids, images) -> _Request:
        given = [x is not None for x in (messages, prompt, prompt_ids)]
        if sum(given) != 1:
            raise InputError("pass exactly one of messages, prompt= or prompt_ids=")
        if images is not None and not isinstance(images, (list, tuple)):
            raise InputError(f"images must be a list of images, got {type(images).__name__}")
        images = list(images or [])
        info = self.manifest.image
        if messages is not None:
            if self.chat is None:
                raise InputError("this artifact has no chat template; pass prompt= or prompt_ids= instead of messages")
            text, found = render_messages(self.chat, messages, info.placeholder if info else None,
                                          None if self.allow_control_tokens else self.codec.escape)
            images = found + images
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
            text = prompt
            if images and info is not None and info.placeholder not in prompt:
                text = info.placeholder * len(images) + "\n" + prompt
        if images and info is None:
            raise InputError("this artifact has no vision graph (text-only model); remove the images")
        if len(images) > self.image_limits.max_images:
            raise ImageError(f"{len(images)} images in one request, more than the limit of "
                             f"{self.image_limits.max_images}; send fewer (or raise ImageLimits.max_images)")
        prepared = [prepare(image, info, self.image_limits) for image in images]
        if prompt_ids is not None:
            if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
                raise InputError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
            ids = list(prompt_ids)
            for i in ids:
                if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
                    raise InputError(f"prompt_ids must hold integer token ids, got {i!r} ({type(i).__name__})")
            ids = [int(i) for i in ids]
            vocab = self.manifest.sizes.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InputError(f"prompt_ids has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            if info is not None:
                ids = expand_ids(ids, info, [p.text for p in prepared])
        else:
            if info is not None:
                text = expand_text(text, info, [p.text for p in prepared])
            ids = self.codec.encode(text, add_bos=messages is None and self.manifest.tokenizer.add_bos_token)
        if not ids:
            raise InputError("the prompt is empty")
        return _Request(ids, prepared)

    def _cache_for(self, capacity: int) -> KVCache | DeviceKVCache:
        if self._cache is None or self._cache.capacity < capacity:
            self._cache = self.engine.new_cache(capacity)
        self._cache.reset()
        return self._cache

    # --- the loop --------------------------------------------------------------------------------
    def _safety_feeds(self, cfg: Optional[SafetyConfig]) -> Optional[dict[str, np.ndarray]]:
        return static_feeds(self._vectors, cfg) if self._vectors is not None else None

    def _run_rows(self, d: _Decode, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, msav_rows: np.ndarray,
                  embeds: Optional[np.ndarray] = None, head_rows: Optional[np.ndarray] = None,
                  rope_positions: Optional[np.ndarray] = None, scratch: bool = False, prefill: bool = False):
        """Asks for one model call (yields a Call) -> its StepOut. Every decoding helper below is a generator in
        this way, so one request's decoding is a coroutine: ``_drive`` runs its calls one by one, a Batch runs
        many requests' calls together."""
        feeds = None if d.feeds is None else {**d.feeds, m.MSAV_MASK: msav_rows}
        if rope_positions is None and d.rope_offset:
            rope_positions = np.broadcast_to(positions + d.rope_offset, (3, *positions.shape))
        return (yield Call(d, mask, positions, None if embeds is not None else ids, embeds, head_rows, feeds,
                           rope_positions, scratch, prefill))

    def _execute(self, c: Call) -> StepOut:
        return self.engine.step(c.d.cache, c.mask, c.positions, ids=c.ids, embeds=c.embeds, head_rows=c.head_rows,
                                top_k=c.d.top_k, safety=c.feeds, rope_positions=c.rope_positions, scratch=c.scratch)

    def _drive(self, coroutine):
        """Runs a decoding coroutine's calls on this Generator's engine, yielding its text pieces; -> its value."""
        sent = None
        try:
            while True:
                try:
                    item = coroutine.send(sent)
                except StopIteration as done:
                    return done.value
                if type(item) is Call:
                    sent = self._execute(item)
                else:
                    sent = None
                    yield item
        finally:
            coroutine.close()

    def _prefill(self, req: _Request, d: _Decode) -> tuple[StepOut, Optional[float]]:
        ids = np.asarray(req.ids, dtype=np.int64)[None]
        n = ids.shape[1]
        embeds = None
        msav_rows = np.zeros((1, n), np.float32)
        info = self.manifest.image
        positions = np.arange(n, dtype=np.int64)[None]
        mask, rope_positions = causal_mask(0, n), None
        if req.images:
            embeds = self.engine.embed_ids(ids)
            is_image = ids[0] == info.image_token_id
            vision_feeds, order = vision_inputs(req.images, info)
            rows = image_rows(req.images, self.engine.run_vision(vision_feeds), info, order)
            if len(rows) != int(is_image.sum()):  # image tokens written into a raw prompt (or allowed control tokens)
                raise InputError(f"the prompt holds {int(is_image.sum())} image tokens where its images fill "
                                 f"{len(rows)}: image tokens typed into the text; remove them, or pass messages")
            embeds[0, is_image] = rows
            if d.msav_on:  # the text after the last image (and, later, every generated token)
                msav_rows[0, int(np.nonzero(is_image)[0].max()) + 1 :] = 1.0
            runs = image_runs(ids[0], info.image_token_id)
            if info.bidirectional:
                mask = both_ways(mask, runs)
            if self.manifest.sizes.mrope_sections:
                rope_positions, d.rope_offset = mrope_positions(ids[0], req.images, info, runs)
        out = yield from self._run_rows(d, ids, mask, positions, msav_rows, embeds, rope_positions=rope_positions,
                                        prefill=True)
        d.cache.advance(n)
        return out, (None if out.harm_logit is None else float(out.harm_logit[0, -1]))

    @contextmanager
    def _serving(self):
        if not self._busy.acquire(blocking=False):
            raise BusyError("this Generator is serving another request (another thread, or a stream() not yet "
                            "finished): finish or close() that stream, or give each thread its own Generator")
        try:
            yield
        finally:
            self._busy.release()

    def _run(self, *args, **kwargs) -> Iterator[str]:
        with self._serving():  # a stream holds it until it finishes or is closed
            return (yield from self._drive(self._serve(*args, **kwargs)))

    def _serve(self, messages, *, prompt=None, prompt_ids=None, images=None, max_new_tokens=128, do_sample=False,
               temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=None, safety="auto",
               min_new_tokens=0, sampling=None, pieces=True, cache_for=None) -> Iterator[str | Call]:
        """One request's decoding, as a coroutine: yields text pieces as they decode (``pieces``; without, and
        without stop strings, the text is decoded once at the end) and the model calls it needs (Call: send back
        the StepOut), and returns the GenerationResult. ``cache_for(capacity)``: the request's KV cache (default:
        this Generator's own)."""
        start = time.perf_counter()
        cfg = resolve_safety(safety, self.manifest.safety)
        if cfg and cfg.refuse_above < 1.0 and not self.manifest.safety.refusal_prefix:
            raise ConfigError("safety knob refuse_above needs the artifact's refusal prefix, which artifacts exported "
                              "before safesteer 0.14 lack: re-export the artifact, or leave refuse_above at 1")
        flat = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        if sampling is not None and flat != SamplingConfig():
            raise ConfigError("pass sampling=SamplingConfig(...) or the flat do_sample / temperature / top_k / top_p / "
                              "seed keywords, not both")
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise ConfigError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        sampler = Sampler(sampling or flat)
        stops = _checked_lengths(max_new_tokens, min_new_tokens, stop)
        req = self._prepare(messages, prompt, prompt_ids, images)
        self._check_context(len(req.ids), max_new_tokens)
        d = self._start(req, cfg, max_new_tokens, cache_for or self._cache_for)
        eos = set(self.manifest.tokenizer.eos_token_ids)
        reply = _Reply(self.codec, stops) if pieces or stops else None
        out, prompt_logit = yield from self._prefill(req, d)
        trace: list[dict[str, Any]] = []
        generated: list[int] = []
        finish, first_token_at = "length", None
        harm = prompt_logit  # the probe's logit at the row whose logits choose the next token
        # the prompt gate: a prompt the probe scores >= refuse_above gets a reply that opens with the refusal prefix
        forced = list(self.manifest.safety.refusal_prefix) if cfg and cfg.forces(score(prompt_logit)) else []
        for step in range(max_new_tokens):
            banned = eos if len(generated) < min_new_tokens else ()
            # the gate: the row that produces this step's logits (the prompt's last row at step 0) scores >= tau
            forcing = bool(forced)
            fired = (not forcing and cfg is not None and step < cfg.lookahead_steps and harm is not None
                     and score(harm) >= cfg.tau)
            if forcing:
                token, record = forced.pop(0), None
            elif fired:  # the candidates (and their branches) are fed: the chosen one's K/V and output are in place
                token, out, record = yield from self._lookahead(d, cfg, sampler, out.logits[0, -1],
                                                                out.top_logprobs[0, -1], out.top_ids[0, -1], banned,
                                                                score(harm), step == 0)
            else:
                token, record = sampler(out.logits[0, -1], banned, out.top_ids[0, -1, 0]), None
            generated.append(token)
            first_token_at = first_token_at or time.perf_counter()
            if token in eos:
                finish = "eos"
            elif reply is not None:
                piece, stopped = reply.push(token)
                finish = "stop" if stopped else finish
                if piece:
                    yield piece
            done = finish != "length" or len(generated) == max_new_tokens
            if not fired and not done:  # the last token is not fed: that pass would only give its probe score
                out, record = yield from self._feed_chosen(d, token, cfg)
                if forcing and record is not None:
                    record["forced"] = True
            if record is not None:
                harm = record.pop("harm_logit")
                trace.append({"step": step, **record})
            if done:
                break
        whole = None if finish == "stop" else self.codec.decode(generated[:-1] if finish == "eos" else generated)
        if reply is None:
            text = whole
        else:
            text, rest = reply.finish(whole)
            if rest:
                yield rest
        timings = Timings(len(req.ids), len(generated), first_token_at - start, time.perf_counter() - first_token_at)
        return GenerationResult(text, generated, finish, timings, prompt_ids=list(req.ids), safety_trace=trace,
                                prompt_score=None if prompt_logit is None else score(prompt_logit))

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        limit = self.engine.context_limit
        if prompt_tokens + max_new_tokens > limit:
            raise PromptTooLongError(
                f"the prompt is {prompt_tokens} tokens (image tokens included) and max_new_tokens is {max_new_tokens}: "
                f"{prompt_tokens + max_new_tokens} > the context of {limit} positions (the model's, or trt_max_tokens on "
                "TensorRT); shorten the prompt or lower max_new_tokens"
            )

    def _start(self, req: _Request, cfg: Optional[SafetyConfig], max_new_tokens: int, cache_for) -> _Decode:
        """The request's decoding state, with a cache sized for the prompt, the reply and one lookahead's rows."""
        k = min(cfg.k, self.manifest.sizes.vocab_size) if cfg else 1
        rows = k + (len(self.manifest.safety.refusal_ids) if cfg else 0)  # lookahead rows per pass, at most
        capacity = len(req.ids) + max_new_tokens + rows * (1 + (cfg.depth if cfg else 0))
        msav_on = bool(cfg and req.images and self.manifest.safety.msav_layer is not None)
        return _Decode(cache_for(capacity), self._safety_feeds(cfg), msav_on, top_k=k)

    def _feed_one(self, d: _Decode, token: int, scratch: bool = False):
        """Feed one token at the next position and commit it; -> (the model's output there, its harm_logit or None).
        ``scratch``: the output goes to the engine's reused buffers (Engine.step)."""
        t = d.cache.length
        # the same id and position arrays every call, refilled: the blocks keep them bound
        d.one_id[0, 0], d.one_position[0, 0] = token, t
        out = yield from self._run_rows(d, d.one_id, d.open_row[..., : t + 1], d.one_position, d.msav_one,
                                        scratch=scratch)
        d.cache.advance(1)
        return out, (None if out.harm_logit is None else float(out.harm_logit[0, 0]))

    def _feed_chosen(self, d: _Decode, token: int, cfg: Optional[SafetyConfig]):
        """Feed a chosen token (its K/V and the next step's logits; probe + correction in-graph). Its output is the
        engine's scratch: the loop has finished with the previous step's (the only other scratch user) by now."""
        out, harm = yield from self._feed_one(d, token, scratch=True)
        if harm is None:
            return out, None
        record = {"token": token, "lookahead": False, "score_chosen": score(harm), "harm_logit": harm}
        if cfg is not None:  # with SafeSteer off the probe still reads along (a monitor: the score only)
            record["gate"] = bool(harm >= d.feeds[m.GATE_LOGIT][0])
        return out, record

    def _candidates(self, logits: np.ndarray, top_lp: np.ndarray, top_ids: np.ndarray, banned, openers: bool) -> tuple:
        """The top-k candidates plus, at the reply's first step (``openers``), the artifact's refusal openers (the
        model's own first refusal tokens, with their log-probs from the full row), minus banned ids."""
        refusal = self.manifest.safety.refusal_ids if openers else ()
        extra = [i for i in refusal if i not in top_ids and i not in banned]
        if extra:
            row = logits.astype(np.float64)
            top = row.max()
            lse = top + np.log(np.exp(row - top).sum())
            top_ids = np.concatenate([top_ids, np.asarray(extra, top_ids.dtype)])
            top_lp = np.concatenate([top_lp, (row[extra] - lse).astype(top_lp.dtype)])
        if banned:  # min_new_tokens: end-of-sequence candidates are dropped before scoring
            keep = ~np.isin(top_ids, list(banned))
            if not keep.any():
                raise ConfigError("min_new_tokens: every lookahead candidate is an end token; raise the safety knob k")
            top_lp, top_ids = top_lp[keep], top_ids[keep]
        return top_lp, top_ids

    def _lookahead(self, d: _Decode, cfg: SafetyConfig, sampler: Sampler, logits: np.ndarray, top_lp: np.ndarray,
                   top_ids: np.ndarray, banned, gate_score: float, first_step: bool):
        """The gate fired: feed the candidates as rows at one position (tree mask), extend each by ``cfg.depth``
        greedy tokens (one pass of rows per token), score each branch by its mean probe score, choose
        argmax(logprob - lam_eff * branch score) (or sample; safety.select), commit the chosen candidate's row."""
        top_lp, top_ids = self._candidates(logits, top_lp, top_ids, banned, first_step)
        k = len(top_ids)
        t = d.cache.length
        rows = np.asarray(top_ids, np.int64)[None]
        msav_rows = np.full((1, k), 1.0 if d.msav_on else 0.0, np.float32)
        out = yield from self._run_rows(d, rows, tree_mask(t, k), np.full((1, k), t, np.int64), msav_rows,
                                        head_rows=np.arange(k))
        scores = sigmoid(out.harm_logit[0])
        branch = (yield from self._extend(d, msav_rows, rows[0], out, scores, cfg.depth)) if cfg.depth else scores
        rng = sampler.rng if sampler.cfg.do_sample else None
        choice = select(top_lp, branch, cfg, rng, sampler.cfg.temperature, gate_score)
        token = int(top_ids[choice])
        if not d.cache.keeps_rows:  # a device cache (rows stay where they are): one more single-row pass
            out, chosen_logit = yield from self._feed_one(d, token)
        else:
            d.cache.keep_row(choice)
            out, chosen_logit = out.row(choice), float(out.harm_logit[0, choice])
        return token, out, {
            "token": token, "lookahead": True, "top1": int(top_ids[0]), "score_gate": gate_score,
            "score_chosen": score(chosen_logit), "changed": token != int(top_ids[0]),
            "gate": bool(chosen_logit >= d.feeds[m.GATE_LOGIT][0]), "candidates": [int(i) for i in top_ids],
            "candidate_scores": [float(x) for x in scores], "branch_scores": [float(x) for x in branch],
            "depth": cfg.depth, "harm_logit": chosen_logit,
        }

    def _extend(self, d: _Decode, msav_rows: np.ndarray, tokens: np.ndarray, first: StepOut, scores: np.ndarray,
                depth: int) -> np.ndarray:
        """Extend each candidate (``first``: their rows) by ``depth`` greedy tokens, one pass of K rows per token;
        -> each branch's mean probe score over its rows up to and including its first end-of-sequence token. The
        passes' rows are scratch after the cache's committed positions; the cache's length is restored."""
        eos = list(self.manifest.tokenizer.eos_token_ids)
        k, t = len(tokens), d.cache.length
        total, count = scores.astype(np.float64).copy(), np.ones(k)
        alive = ~np.isin(tokens, eos)
        nxt = first.top_ids[0, :, 0].astype(np.int64)
        for i in range(1, depth + 1):
            if not alive.any():
                break
            d.cache.advance(k)  # the previous pass's rows become part of the past
            out = yield from self._run_rows(d, nxt[None], tree_mask(t, k, passes=i + 1),
                                            np.full((1, k), t + i, np.int64), msav_rows, head_rows=np.arange(k))
            total += alive * sigmoid(out.harm_logit[0])
            count += alive
            alive &= ~np.isin(nxt, eos)
            nxt = out.top_ids[0, :, 0].astype(np.int64)
        d.cache.truncate(t)
        return total / count
