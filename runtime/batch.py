"""Continuous batching: many requests decode together, one model call per step for all of them.

Each request decodes as the Generator's own coroutine (Generator._serve: the same code as a lone request), which
yields the model calls it needs in its own positions. A Batch gathers one call from every active request and runs
them as one: the rows side by side over one shared KV cache in which every request owns a list of slots (its
positions, in order), under a mask that lets each row see its own request's slots and no other's, each row at its
own position. Requests join and leave between steps; a prompt longer than ``prefill_chunk`` rows is fed a chunk
per step, so a joining request stalls the others for one chunk at most.

SafeSteer stays per request: the gate, the lookahead candidates and their branches are that request's rows of the
step; the MSAV's strength goes into its msav_mask rows (beta * mask, with the call's beta at 1); the in-graph
correction's knobs (alpha, the gate) are one per call, so requests with different ones run as separate calls in the
same step. Greedy tokens equal a lone run's (tests/test_batch.py).

A lookahead row is kept by recording its slot (nothing moves); slots freed by finished requests and discarded rows
are reclaimed by compacting the cache (live slots moved to the front) when a step would not fit.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import manifest as m
from .engine import StepOut
from .errors import ConfigError, PromptTooLongError
from .generator import Call, GenerationResult, Generator
from .masks import windowed

BLOCKED = np.finfo(np.float32).min
_GENERATE_ARGS = frozenset(inspect.signature(Generator.generate).parameters) - {"self", "messages", "unknown"}


class SlotCache:
    """A request's KV cache inside a Batch's shared one: the shared slot that holds each of its positions. It
    answers the Generator's loop like a cache of its own (length, advance, truncate, keep_row)."""

    keeps_rows = True  # keep_row records the chosen row's slot: nothing is copied

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slots: list[int] = []  # the committed positions' slots
        self.tail: list[int] = []  # slots of the rows written after them (the last call's; truncated ones in front)

    @property
    def length(self) -> int:
        return len(self.slots)

    def check_room(self, rows: int) -> None:
        if self.length + rows > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length + rows} > capacity {self.capacity}")

    def advance(self, rows: int) -> None:
        if rows > len(self.tail):
            raise RuntimeError(f"cannot commit {rows} rows: only {len(self.tail)} were written")
        self.slots += self.tail[:rows]
        del self.tail[:rows]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.tail = self.slots[length:] + self.tail
        del self.slots[length:]

    def keep_row(self, row: int) -> None:
        self.slots.append(self.tail[row])
        self.tail = []

    def reset(self) -> None:
        self.slots, self.tail = [], []


@dataclass(eq=False)
class BatchRequest:
    """One request in a Batch: its text pieces as they decode (``take``), then ``result`` or ``error``."""

    coroutine: Any
    call: Optional[Call] = None  # the model call it waits for
    done_rows: int = 0  # rows of that call already run (a prompt fed in chunks)
    done_slots: list[int] = field(default_factory=list)
    harm_parts: list[np.ndarray] = field(default_factory=list)
    sliding: Optional[np.ndarray] = None  # the call's sliding-window mask, in the request's positions
    chunkable: bool = False  # the call is a prompt that may be fed in chunks (_chunkable)
    pieces: list[str] = field(default_factory=list)
    result: Optional[GenerationResult] = None
    error: Optional[BaseException] = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None or self.cancelled

    @property
    def reserved(self) -> int:
        return self.call.d.cache.capacity if self.call is not None else 0

    def take(self) -> list[str]:
        """The text pieces decoded since the last take."""
        out, self.pieces = self.pieces, []
        return out


class Batch:
    """Decodes up to ``max_batch`` requests of one Generator together (continuous batching).

        batch = Batch(gen, max_batch=8)
        a = batch.add([{"role": "user", "content": "Hi"}], max_new_tokens=32)   # generate()'s arguments
        while not a.finished:
            batch.step()            # one model call for every active request; others can join in between
        a.result.text

    ``capacity``: positions in the shared KV cache (default 8192; a request reserves its prompt, max_new_tokens
    and one lookahead's rows, and waits until that fits). ``prefill_chunk``: the most prompt rows fed per step.
    A Batch is driven from one thread; it holds the Generator while a step runs (a stream() open on the same
    Generator makes it raise BusyError).
    """

    def __init__(self, gen: Generator, *, max_batch: int = 8, capacity: int = 8192, prefill_chunk: int = 32):
        for name, v in (("max_batch", max_batch), ("capacity", capacity), ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        self.gen, self.max_batch, self.prefill_chunk = gen, max_batch, prefill_chunk
        self.cache = gen.engine.new_cache(capacity)
        self.window = gen.manifest.sizes.sliding_window
        self.mrope = bool(gen.manifest.sizes.mrope_sections)
        self.active: list[BatchRequest] = []
        self.waiting: list[BatchRequest] = []
        self.compactions = 0

    # --- requests ------------------------------------------------------------------------------------------
    def add(self, messages=None, *, stream: bool = False, **kwargs) -> BatchRequest:
        """Queues a request (generate()'s arguments; ``stream``: keep text pieces for ``take``). The request is
        checked and its prompt (and images) prepared now: a bad one raises here, as generate() would."""
        unknown = set(kwargs) - _GENERATE_ARGS
        if unknown:
            raise ConfigError(f"unknown argument(s) {sorted(unknown)}; Batch.add takes generate()'s arguments")
        req = BatchRequest(self.gen._serve(messages, pieces=stream, cache_for=SlotCache, **kwargs))
        with self.gen._serving():
            self._advance(req, None, raise_errors=True)
        if req.finished:
            return req
        need = req.reserved
        if need > self.cache.capacity:
            req.coroutine.close()
            raise PromptTooLongError(f"the request needs {need} positions (prompt, max_new_tokens and lookahead rows) "
                                     f"and the batch's KV cache holds {self.cache.capacity}; shorten it or give the "
                                     "Batch a larger capacity")
        self.waiting.append(req)
        return req

    def cancel(self, req: BatchRequest) -> None:
        """Drops a request at once (its slots are free for the next step)."""
        if req.finished:
            return
        req.cancelled = True
        req.coroutine.close()
        for queue in (self.active, self.waiting):
            if req in queue:
                queue.remove(req)

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def generate_all(self, requests: list[dict]) -> list[GenerationResult]:
        """Runs ``requests`` (each a dict of generate()'s arguments) to the end together -> their results, in
        order; the first failed request's error is raised after all have finished."""
        reqs = [self.add(**r) for r in requests]
        while self.busy:
            self.step()
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [r.result for r in reqs]

    # --- stepping ------------------------------------------------------------------------------------------
    def step(self) -> list[BatchRequest]:
        """One model call for every active request (one per SafeSteer correction setting among them) -> the
        requests that got new text pieces or finished in it."""
        touched: list[BatchRequest] = []
        with self.gen._serving():
            self._admit()
            plan = self._plan()
            groups: dict[Any, list[tuple[BatchRequest, int]]] = {}
            for req, take in plan:
                groups.setdefault(_knobs(req.call), []).append((req, take))
            for key, members in groups.items():
                touched += self._run(key, members)
        self.active = [r for r in self.active if not r.finished]
        return touched

    def _admit(self) -> None:
        reserved = sum(r.reserved for r in self.active)
        while self.waiting and len(self.active) < self.max_batch:
            if reserved + self.waiting[0].reserved > self.cache.capacity:
                break
            req = self.waiting.pop(0)
            reserved += req.reserved
            self.active.append(req)

    def _plan(self) -> list[tuple[BatchRequest, int]]:
        """(request, rows of its call to run now): all of a decoding call; of prompts, ``prefill_chunk`` rows in
        all, in arrival order (a prompt whose mask is not causal, e.g. an image seen both ways, goes whole)."""
        budget, plan = self.prefill_chunk, []
        for req in self.active:
            c = req.call
            left = c.rows - req.done_rows
            if not c.prefill:
                plan.append((req, left))
            elif budget > 0:
                if req.chunkable:
                    take = min(left, budget)
                elif left <= budget or budget == self.prefill_chunk:
                    take = left
                else:
                    continue
                plan.append((req, take))
                budget -= take
        return plan

    def _run(self, key, members: list[tuple[BatchRequest, int]]) -> list[BatchRequest]:
        """One engine call for ``members``' rows; each request gets its share of the outputs and decodes on."""
        rows = sum(take for _, take in members)
        if self.cache.length + rows > self.cache.capacity:
            self._compact()
        past = self.cache.length
        total = past + rows
        mask = np.full((1, 1, rows, total), BLOCKED, np.float32)
        sliding = mask.copy() if self.window else None
        positions, ids, embeds, rope, msav, heads = [], [], [], [], [], []
        final, top_k, offset = {}, 1, 0  # final: id(request) -> (its first head row, how many) for complete calls
        with_embeds = any(req.call.embeds is not None for req, _ in members)
        for req, take in members:
            c, a = req.call, req.done_rows
            b = a + take
            past_slots = req.call.d.cache.slots + req.done_slots
            own = slice(past + offset, past + offset + take)
            logical = c.mask.shape[3] - c.rows + a  # the request's positions before this chunk
            for phys, mine in ((mask, c.mask), (sliding, None)):
                if phys is None:
                    continue
                if mine is None:
                    if req.sliding is None:
                        req.sliding = windowed(c.mask, c.positions, self.window)
                    mine = req.sliding
                rows_here = phys[0, 0, offset : offset + take]  # a view: [take, past + rows]
                rows_here[:, past_slots] = mine[0, 0, a:b, :logical]
                rows_here[:, own] = mine[0, 0, a:b, logical : logical + take]
            positions.append(c.positions[:, a:b])
            if with_embeds:
                embeds.append(c.embeds[:, a:b] if c.embeds is not None
                              else self.gen.engine.embed_ids(np.ascontiguousarray(c.ids[:, a:b])))
            else:
                ids.append(c.ids[:, a:b])
            if self.mrope:
                rope.append(c.rope_positions[..., a:b] if c.rope_positions is not None
                            else np.broadcast_to(c.positions[:, a:b], (3, 1, take)))
            if c.feeds is not None:
                msav.append(c.feeds[m.MSAV_MASK][:, a:b] * c.feeds[m.MSAV_BETA][0])
            if b == c.rows:  # this call is complete: its head rows run now
                head = np.array([c.rows - 1]) if c.head_rows is None else np.asarray(c.head_rows)
                final[id(req)] = len(heads), len(head)
                heads.extend((offset + head - a).tolist())
                top_k = max(top_k, c.d.top_k)
            offset += take
        feeds = None
        if key is not None:
            base = members[0][0].call.feeds
            feeds = {**base, m.MSAV_BETA: np.ones(1, np.float32), m.MSAV_MASK: np.concatenate(msav, axis=1)}
        extra = {"sliding": sliding} if sliding is not None else {}
        head_rows = np.asarray(heads or [0], np.int64)  # a step of prompt chunks only: one row's head is ignored
        try:
            out = self.gen.engine.step(
                self.cache, mask, np.concatenate(positions, axis=1),
                ids=None if with_embeds else np.concatenate(ids, axis=1),
                embeds=np.concatenate(embeds, axis=1) if with_embeds else None, head_rows=head_rows, top_k=top_k,
                safety=feeds, rope_positions=np.concatenate(rope, axis=2) if self.mrope else None, **extra)
        except Exception as exc:  # these requests fail (the rows they wrote are not committed); the batch goes on
            for req, _ in members:
                req.error, req.call = exc, None
                req.coroutine.close()
            return [req for req, _ in members]
        self.cache.advance(rows)
        touched = []
        offset = 0
        for req, take in members:
            slots = list(range(past + offset, past + offset + take))
            harm = None if out.harm_logit is None else out.harm_logit[:, offset : offset + take]
            offset += take
            if id(req) not in final:  # a prompt chunk: the rest follows in later steps
                req.done_rows += take
                req.done_slots += slots
                if harm is not None:
                    req.harm_parts.append(harm)
                continue
            h, count = final[id(req)]
            k = req.call.d.top_k
            if harm is not None and req.harm_parts:
                harm = np.concatenate([*req.harm_parts, harm], axis=1)
            share = StepOut(out.logits[:, h : h + count], out.top_logprobs[:, h : h + count, :k],
                            out.top_ids[:, h : h + count, :k], harm)
            req.call.d.cache.tail = req.done_slots + slots
            req.done_rows, req.done_slots, req.harm_parts, req.sliding = 0, [], [], None
            self._advance(req, share)
            touched.append(req)
        return touched

    def _advance(self, req: BatchRequest, out: Optional[StepOut], raise_errors: bool = False) -> None:
        """Sends ``out`` into the request's coroutine and runs it to its next model call (or its end), keeping
        the text pieces it yields on the way."""
        try:
            item = req.coroutine.send(out)
            while type(item) is not Call:
                req.pieces.append(item)
                item = req.coroutine.send(None)
            req.call = item
            req.chunkable = item.prefill and _chunkable(item)
        except StopIteration as done:
            req.result, req.call = done.value, None
        except Exception as exc:  # the request fails; the batch and its other requests go on
            req.error, req.call = exc, None
            if raise_errors:
                raise

    def _compact(self) -> None:
        """Moves every live slot (active requests' positions and prompt chunks) to the front of the cache."""
        live = sorted(s for r in self.active if r.call is not None for s in r.call.d.cache.slots + r.done_slots)
        remap = np.zeros(self.cache.length, np.int64)
        remap[live] = np.arange(len(live))
        self.cache.compact(np.asarray(live, np.int64))
        self.compactions += 1
        for r in self.active:
            if r.call is not None:
                cache = r.call.d.cache
                cache.slots, cache.tail = remap[cache.slots].tolist(), []
                r.done_slots = remap[r.done_slots].tolist()


def _knobs(c: Call):
    """The in-graph correction's settings a call runs under (calls with different ones cannot share a pass)."""
    if c.feeds is None:
        return None
    alpha = float(c.feeds[m.STEER_ALPHA][0])
    return alpha, float(c.feeds[m.GATE_LOGIT][0]) if alpha else 0.0


def _chunkable(c: Call) -> bool:
    """A prompt may be fed in chunks when its rows are causal among themselves (no row sees a later one) and only
    its last row's head output is asked for."""
    if c.head_rows is not None:
        return False
    own = c.mask[0, 0, :, c.mask.shape[3] - c.rows :]
    return bool((own[np.triu_indices(c.rows, 1)] == BLOCKED).all())
