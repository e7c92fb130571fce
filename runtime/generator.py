"""``Generator``: prompt -> KV-cached decode loop over the artifact's graphs -> text.

Not thread-safe: one Generator serves one request at a time (it reuses its KV cache buffers).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from . import manifest as m
from .engine import Engine
from .errors import ConfigError, InputError, PromptTooLongError
from .images import ImageLike, preprocess
from .kv_cache import KVCache
from .masks import causal_mask
from .sampling import Sampler, SamplingConfig
from .sessions import Providers, SessionConfig, resolve_providers
from .text import ChatTemplate, IncrementalDecoder, TextCodec, load_chat_template

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


@dataclass
class _Request:
    ids: list[int]
    pixels: Optional[np.ndarray]  # [num_images, 3, H, W]


class Generator:
    """Loads an artifact made by ``safesteer-export`` and generates text with onnxruntime."""

    def __init__(self, artifact_dir: str | Path, providers: Providers = "auto", *, threads: int = 0,
                 verify: bool = True, engine_cache_dir: Optional[str | Path] = None):
        self.root = Path(artifact_dir)
        self.manifest = m.load_manifest(self.root, verify_files=verify)
        cfg = SessionConfig(
            providers=resolve_providers(providers), intra_op_threads=threads,
            cache_dir=Path(engine_cache_dir) if engine_cache_dir else self.root / "trt_cache",
        )
        self.engine = Engine(self.root, self.manifest, cfg)
        self.providers = self.engine.providers()
        log.info("execution providers per graph: %s", self.providers)
        self.codec = TextCodec(self.root, self.manifest.tokenizer)
        self.chat: Optional[ChatTemplate] = load_chat_template(self.root, self.manifest.tokenizer)
        self._cache: Optional[KVCache] = None

    # --- public API ----------------------------------------------------------------------------
    def generate(self, messages: Optional[Sequence[dict]] = None, *, prompt: Optional[str] = None,
                 prompt_ids: Optional[Sequence[int]] = None, images: Optional[Sequence[ImageLike]] = None,
                 max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                 safety: Any = False) -> GenerationResult:
        run = self._run(messages, prompt=prompt, prompt_ids=prompt_ids, images=images,
                        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, stop=stop, safety=safety)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def stream(self, messages: Optional[Sequence[dict]] = None, **kwargs) -> Iterator[str]:
        """Like ``generate`` (same keyword arguments) but yields text pieces as they decode."""
        yield from self._run(messages, **kwargs)

    # --- request preparation -----------------------------------------------------------------
    def _check_safety(self, safety: Any) -> None:
        if safety in (False, None):
            return
        raise ConfigError(
            "SafeSteer decoding is not available in this version of the runtime (only safety=False); "
            "see the README's 'not yet done' section"
        )

    def _prepare(self, messages, prompt, prompt_ids, images) -> _Request:
        given = [x is not None for x in (messages, prompt, prompt_ids)]
        if sum(given) != 1:
            raise InputError("pass exactly one of messages, prompt= or prompt_ids=")
        images = list(images or [])
        image_info = self.manifest.image
        if messages is not None:
            text, images = self._render(messages, images)
            ids = self.codec.encode(text, add_bos=False)
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
            if images and image_info is not None and image_info.image_token not in prompt:
                prompt = image_info.image_token * len(images) + "\n" + prompt
            ids = self.codec.encode(prompt, add_bos=self.manifest.tokenizer.add_bos_token)
        else:
            ids = [int(i) for i in prompt_ids]
            vocab = self.manifest.sizes.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InputError(f"prompt_ids has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if not ids:
            raise InputError("the prompt is empty")
        if images and image_info is None:
            raise InputError("this artifact has no vision graph (text-only model); remove the images")
        pixels = None
        if image_info is not None:
            ids = self._expand_image_tokens(ids, len(images))
            if images:
                pixels = np.stack([preprocess(img, image_info) for img in images])
        return _Request(ids, pixels)

    def _render(self, messages, images: list) -> tuple[str, list]:
        if self.chat is None:
            raise InputError("this artifact has no chat template; pass prompt= or prompt_ids= instead of messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        placeholder = self.manifest.image.image_token if self.manifest.image else None
        rendered = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise InputError(f"messages[{i}] must be a dict with 'role' and 'content'")
            content = msg["content"]
            if isinstance(content, str):
                rendered.append(dict(msg))
                continue
            parts, flat = [], []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                    flat.append(part.get("text", ""))
                elif kind == "image":
                    if "image" not in part:
                        raise InputError(f"messages[{i}] has an image part without an 'image' (PIL.Image or path)")
                    images.append(part["image"])
                    parts.append({"type": "image"})
                    flat.append((placeholder or "") + "\n")
                else:
                    raise InputError(f"messages[{i}] content parts must be {{'type': 'text'|'image', ...}}, got {part!r}")
            rendered.append({**msg, "content": parts if self.chat.takes_content_lists else "".join(flat)})
        return self.chat.render(rendered, add_generation_prompt=True), images

    def _expand_image_tokens(self, ids: list[int], num_images: int) -> list[int]:
        info = self.manifest.image
        count = sum(1 for i in ids if i == info.image_token_id)
        if count == num_images * info.tokens_per_image and num_images:
            return ids  # already expanded
        if count != num_images:
            raise InputError(
                f"the prompt has {count} image placeholder(s) ({info.image_token!r}) but {num_images} image(s) were "
                "given; use one placeholder per image"
            )
        out: list[int] = []
        for i in ids:
            out.extend([i] * info.tokens_per_image if i == info.image_token_id else [i])
        return out

    def _cache_for(self, capacity: int) -> KVCache:
        if self._cache is None or self._cache.capacity < capacity:
            self._cache = self.engine.new_cache(capacity)
        self._cache.reset()
        return self._cache

    # --- the loop --------------------------------------------------------------------------------
    def _prefill(self, req: _Request, cache: KVCache) -> np.ndarray:
        ids = np.asarray(req.ids, dtype=np.int64)[None]
        embeds = self.engine.embed_ids(ids)
        if req.pixels is not None:
            features = self.engine.image_features(req.pixels)
            embeds[0, ids[0] == self.manifest.image.image_token_id] = features.reshape(-1, features.shape[-1])
        hidden = self.engine.forward(embeds, causal_mask(0, ids.shape[1]), cache)
        cache.advance(ids.shape[1])
        return hidden[:, -1:]

    def _step(self, token: int, cache: KVCache) -> np.ndarray:
        embeds = self.engine.embed_ids(np.array([[token]], dtype=np.int64))
        hidden = self.engine.forward(embeds, causal_mask(cache.length, 1), cache)
        cache.advance(1)
        return hidden

    def _run(self, messages, *, prompt=None, prompt_ids=None, images=None, max_new_tokens=128, do_sample=False,
             temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=None, safety=False) -> Iterator[str]:
        start = time.perf_counter()
        self._check_safety(safety)
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(stop, str):
            raise ConfigError("stop must be a list of strings, e.g. stop=['\\n\\n']")
        stops = [s for s in (stop or []) if s]
        req = self._prepare(messages, prompt, prompt_ids, images)
        limit = self.manifest.sizes.max_positions
        if len(req.ids) + max_new_tokens > limit:
            raise PromptTooLongError(
                f"the prompt is {len(req.ids)} tokens (image tokens included) and max_new_tokens is {max_new_tokens}: "
                f"{len(req.ids) + max_new_tokens} > the model's context of {limit} positions; shorten the prompt or "
                "lower max_new_tokens"
            )
        cache = self._cache_for(len(req.ids) + max_new_tokens)
        sampler = Sampler(sampling)
        eos = set(self.manifest.tokenizer.eos_token_ids)
        decoder = IncrementalDecoder(self.codec)
        timings = Timings(prompt_tokens=len(req.ids))

        hidden = self._prefill(req, cache)
        generated: list[int] = []
        text, emitted, finish = "", 0, "length"
        hold = max((len(s) for s in stops), default=1) - 1
        first_token_at = None
        while True:
            logits, _, _ = self.engine.logits(hidden)
            token = sampler(logits[0, -1])
            generated.append(token)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token in eos:
                finish = "eos"
                break
            text += decoder.push(token)
            hit = min((i for i in (text.find(s, max(0, emitted - hold)) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                text, finish = text[:hit], "stop"
                break
            if len(text) - hold > emitted:
                yield text[emitted : len(text) - hold]
                emitted = len(text) - hold
            if len(generated) == max_new_tokens:
                break
            hidden = self._step(token, cache)
        if len(text) > emitted:
            yield text[emitted:]
        end = time.perf_counter()
        timings.new_tokens = len(generated)
        timings.prefill_s = first_token_at - start
        timings.decode_s = end - first_token_at
        return GenerationResult(text, generated, finish, timings, prompt_ids=list(req.ids))
