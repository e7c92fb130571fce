"""``safesteer-serve``: an OpenAI-compatible HTTP server around one Generator (Starlette + uvicorn).

One worker thread owns the Generator and a Batch (runtime/batch.py): requests decode together, one model call per
step for all of them, and join or leave between steps (continuous batching; a long prompt is fed a chunk per step).
The event loop only parses, queues and streams: a request waits in a bounded queue (full: 503) until the batch has
room, its pieces come back through an asyncio queue, and a client that disconnects sets its job's cancel flag, which
drops its row from the batch at the next step.

Why Starlette and not FastAPI: requests are validated by the runtime's own typed configs (SafetyConfig,
ImageLimits, the Generator's checks), so a second validation layer (pydantic models) would only restate them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from safesteer_runtime.batch import Batch
from safesteer_runtime.errors import BusyError, ConfigError, InputError, SafeSteerError
from safesteer_runtime.images import ImageLimits
from safesteer_runtime.safety import SafetyConfig

DONE = object()  # end of a job's event stream


@dataclass(frozen=True)
class ServeConfig:
    max_body_bytes: int = 20 * 2**20  # a request with a few images as data: URLs
    max_tokens: int = 1024  # the most a request may ask for (and the default when it does not say)
    max_queue: int = 16  # requests waiting for a place in the batch; more are refused with 503
    request_timeout_s: float = 600.0  # a request still unfinished after this is cancelled
    max_batch: int = 8  # requests decoding together
    prefill_chunk: int = 32  # prompt rows fed per step (what a joining request may stall the others by)
    kv_capacity: int = 8192  # positions in the batch's shared KV cache (the default model: ~25 KB each)
    image_limits: ImageLimits = ImageLimits(allow_paths=False)

    def __post_init__(self):
        for name in ("max_body_bytes", "max_tokens", "max_queue", "max_batch", "prefill_chunk", "kv_capacity"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Job:
    messages: list
    kwargs: dict
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Metrics:
    """Counters and gauges in Prometheus' text format."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"requests_total": 0, "requests_failed_total": 0, "requests_rejected_total": 0,
                       "prompt_tokens_total": 0, "completion_tokens_total": 0, "gate_firings_total": 0,
                       "steered_steps_total": 0, "cancelled_total": 0, "batch_steps_total": 0}
        self.active = 0

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                self.counts[name] += n

    def text(self, queued: int) -> str:
        lines = []
        with self.lock:
            for name, value in self.counts.items():
                lines += [f"# TYPE safesteer_{name} counter", f"safesteer_{name} {value}"]
            lines += ["# TYPE safesteer_queue_depth gauge", f"safesteer_queue_depth {queued}",
                      "# TYPE safesteer_batch_occupancy gauge", f"safesteer_batch_occupancy {self.active}"]
        return "\n".join(lines) + "\n"


class Worker(threading.Thread):
    """Owns the Generator's Batch: takes jobs from the queue while the batch has room, steps it, and streams each
    request's pieces and result back to the event loop. ``None`` from the queue stops it."""

    def __init__(self, gen, jobs: "queue.Queue[Optional[Job]]", metrics: Metrics, cfg: ServeConfig):
        super().__init__(name="safesteer-worker", daemon=True)
        self.batch = Batch(gen, max_batch=cfg.max_batch, capacity=cfg.kv_capacity, prefill_chunk=cfg.prefill_chunk)
        self.jobs, self.metrics = jobs, metrics
        self.live: dict = {}  # BatchRequest -> Job

    def run(self) -> None:
        while True:
            if not self.batch.busy and not self._join(self.jobs.get()):  # idle: wait for work
                return
            while len(self.batch.active) + len(self.batch.waiting) < self.batch.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if not self._join(job):
                    return
            self._drop_cancelled()
            if not self.batch.busy:
                continue
            touched = self.batch.step()
            self.metrics.add(batch_steps_total=1)
            self.metrics.active = len(self.batch.active)
            for req in touched:
                self._deliver(req)

    def _join(self, job: Optional[Job]) -> bool:
        """The job into the batch (a bad request gets its error at once); False on the stop signal."""
        if job is None:
            return False
        if job.cancel.is_set():
            self.metrics.add(cancelled_total=1)
            job.emit(DONE)
            return True
        try:
            req = self.batch.add(job.messages, stream=job.stream, **job.kwargs)
        except Exception as exc:  # typed or not, it goes back to its request; the worker lives on
            job.emit(("error", exc))
            job.emit(DONE)
            return True
        self.live[req] = job
        if req.finished:
            self._deliver(req)
        return True

    def _deliver(self, req) -> None:
        job = self.live.get(req)
        if job is None:
            return
        for piece in req.take():
            job.emit(("piece", piece))
        if req.finished:
            del self.live[req]
            job.emit(("result", req.result) if req.error is None else ("error", req.error))
            job.emit(DONE)

    def _drop_cancelled(self) -> None:
        """A client that went away (or timed out) frees its row now."""
        for req, job in list(self.live.items()):
            if job.cancel.is_set():
                self.batch.cancel(req)
                del self.live[req]
                self.metrics.add(cancelled_total=1)
                job.emit(DONE)


# --- request parsing -------------------------------------------------------------------------------------------
def _image(url: Any) -> bytes:
    """An image part's bytes from a data: URL or bare base64; never a network fetch or a server path."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise HTTPError(400, "image_url.url must be a data: URL (data:image/png;base64,...)", param="messages")
    if url.startswith(("http://", "https://", "file:", "/")):
        raise HTTPError(400, "images are never fetched or read from paths: send them inline as data: URLs",
                        param="messages")
    payload = url.split(",", 1)[1] if url.startswith("data:") and "," in url else url
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "an image data: URL is not valid base64", param="messages") from None


def messages_of(body: dict) -> list:
    """OpenAI chat messages -> the Generator's (text parts stay, image_url parts become image bytes)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise HTTPError(400, "messages must be a non-empty list", param="messages")
    out = []
    for msg in msgs:
        if not isinstance(msg, dict):
            raise HTTPError(400, "each message must be an object with role and content", param="messages")
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    parts.append({"type": "image", "image": _image(part.get("image_url"))})
                elif kind == "text":
                    parts.append({"type": "text", "text": part.get("text")})
                else:
                    raise HTTPError(400, f"unsupported content part {kind!r}: use text and image_url parts",
                                    param="messages")
            content = parts
        out.append({"role": msg.get("role"), "content": content})
    return out


def generation_kwargs(body: dict, gen, cfg: ServeConfig) -> dict:
    """OpenAI sampling fields and the ``safesteer`` extension -> Generator keyword arguments."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", cfg.max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= cfg.max_tokens:
        raise HTTPError(400, f"max_tokens must be an integer in [1, {cfg.max_tokens}]", param="max_tokens")
    temperature = body.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise HTTPError(400, "temperature must be a number in [0, 2]", param="temperature")
    stop = body.get("stop")
    kwargs = {"max_new_tokens": max_tokens, "stop": [stop] if isinstance(stop, str) else stop,
              "do_sample": temperature > 0, "temperature": float(temperature) if temperature > 0 else 1.0,
              "top_p": body.get("top_p", 1.0), "seed": body.get("seed")}
    steer = body.get("safesteer")
    if steer is None:
        kwargs["safety"] = "auto"
    elif not isinstance(steer, dict):
        raise HTTPError(400, "safesteer must be an object of SafetyConfig fields", param="safesteer")
    elif gen.manifest.safety is None:
        raise HTTPError(400, "this artifact has no SafeSteer calibration; omit safesteer", param="safesteer")
    else:
        kwargs["safety"] = SafetyConfig.from_manifest(gen.manifest.safety, **steer)
    return kwargs


def _error(exc: HTTPError):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": None}},
                        status_code=exc.status)


def _as_http(exc: BaseException) -> HTTPError:
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, (InputError, ConfigError)):
        return HTTPError(400, str(exc))
    if isinstance(exc, BusyError):
        return HTTPError(503, str(exc), kind="server_busy")
    return HTTPError(500, f"internal error ({type(exc).__name__}); see the server log", kind="server_error")


def _summary(result) -> dict:
    fired = [t for t in result.safety_trace if t.get("lookahead")]
    return {"prompt_score": result.prompt_score, "gate_firings": len(fired),
            "steps_steered": sum(1 for t in fired if t.get("changed"))}


# --- the app ---------------------------------------------------------------------------------------------------
class _Tagged:
    """ASGI middleware: every HTTP response says which server instance made it (header x-safesteer-replica)."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (b"x-safesteer-replica", value.encode())

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


def build_app(gen, model_name: str, cfg: ServeConfig = ServeConfig(), instance: Optional[str] = None):
    """The Starlette app around ``gen``; ``instance`` names this server in every response (Ray replicas)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    gen.image_limits = cfg.image_limits
    jobs: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=cfg.max_queue)
    metrics = Metrics()
    worker = Worker(gen, jobs, metrics, cfg)
    worker.start()

    async def read_body(request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > cfg.max_body_bytes:
            raise HTTPError(413, f"the request body is over {cfg.max_body_bytes} bytes", kind="request_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                raise HTTPError(413, f"the request body is over {cfg.max_body_bytes} bytes", kind="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return body

    async def chat(request: Request):
        try:
            body = await read_body(request)
            job = Job(messages_of(body), generation_kwargs(body, gen, cfg), asyncio.get_running_loop(),
                      stream=bool(body.get("stream")))
            try:
                jobs.put_nowait(job)
            except queue.Full:
                metrics.add(requests_rejected_total=1)
                raise HTTPError(503, f"the server's queue is full ({cfg.max_queue} waiting); retry later",
                                kind="server_busy") from None
        except (HTTPError, SafeSteerError) as exc:
            metrics.add(requests_failed_total=1)
            return _error(_as_http(exc))
        metrics.add(requests_total=1)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "created": created, "model": model_name}
        if body.get("stream"):
            return StreamingResponse(_stream(job, base), media_type="text/event-stream")
        return await _complete(job, base)

    async def events(job: Job):
        deadline = time.monotonic() + cfg.request_timeout_s
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancel.set()
                yield ("error", HTTPError(504, "the request timed out", kind="timeout"))
                return
            if event is DONE:
                return
            yield event

    def account(result) -> dict:
        summary = _summary(result)
        metrics.add(prompt_tokens_total=len(result.prompt_ids), completion_tokens_total=len(result.token_ids),
                    gate_firings_total=summary["gate_firings"], steered_steps_total=summary["steps_steered"])
        return summary

    def usage(result) -> dict:
        return {"prompt_tokens": len(result.prompt_ids), "completion_tokens": len(result.token_ids),
                "total_tokens": len(result.prompt_ids) + len(result.token_ids)}

    async def _complete(job: Job, base: dict):
        try:
            async for kind, value in events(job):
                if kind == "error":
                    raise value
                if kind == "result":
                    return JSONResponse({
                        **base, "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": value.text},
                                     "finish_reason": _finish(value.finish_reason)}],
                        "usage": usage(value), "safesteer": account(value)})
        except BaseException as exc:
            job.cancel.set()
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                raise
            metrics.add(requests_failed_total=1)
            return _error(_as_http(exc))
        return _error(HTTPError(500, "the request ended without a result", kind="server_error"))

    async def _stream(job: Job, base: dict):
        def chunk(delta: dict, finish=None, **extra) -> str:
            return "data: " + json.dumps({**base, "object": "chat.completion.chunk", **extra, "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for kind, value in events(job):
                if kind == "piece":
                    yield chunk({"content": value})
                elif kind == "result":
                    yield chunk({}, _finish(value.finish_reason), usage=usage(value), safesteer=account(value))
                else:
                    metrics.add(requests_failed_total=1)
                    err = _as_http(value)
                    yield "data: " + json.dumps({"error": {"message": err.message, "type": err.kind}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): the worker stops at its next token
            job.cancel.set()

    async def models(_request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "safesteer"}]})

    async def health(_request: Request):
        return JSONResponse({"status": "ok", "queue_depth": queued(), "batch": len(worker.batch.active)})

    def queued() -> int:
        return jobs.qsize() + len(worker.batch.waiting)

    async def prometheus(_request: Request):
        return PlainTextResponse(metrics.text(queued()), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models), Route("/health", health), Route("/metrics", prometheus)],
                     middleware=[Middleware(_Tagged, value=instance)] if instance else [])


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="safesteer-serve", description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="artifact directory written by safesteer-export")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the artifact's folder name)")
    p.add_argument("--max-tokens", type=int, default=ServeConfig.max_tokens)
    p.add_argument("--max-queue", type=int, default=ServeConfig.max_queue)
    p.add_argument("--max-body-mb", type=float, default=ServeConfig.max_body_bytes / 2**20)
    p.add_argument("--timeout", type=float, default=ServeConfig.request_timeout_s, help="seconds per request")
    p.add_argument("--max-batch", type=int, default=ServeConfig.max_batch, help="requests decoding together")
    p.add_argument("--prefill-chunk", type=int, default=ServeConfig.prefill_chunk,
                   help="prompt rows fed per step (bounds how long a joining request stalls the others)")
    p.add_argument("--kv-capacity", type=int, default=ServeConfig.kv_capacity,
                   help="positions in the batch's shared KV cache")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = onnxruntime default)")
    p.add_argument("--expected-sha256", default=None, help="refuse the artifact unless manifest.json has this sha256")
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment (the serve-ray extra)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: server replicas, each its own Generator")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("safesteer-serve needs the serve extra: pip install 'safesteer[serve]'", file=sys.stderr)
        return 2
    from pathlib import Path

    from safesteer_rt import Generator

    try:
        cfg = ServeConfig(max_body_bytes=int(args.max_body_mb * 2**20), max_tokens=args.max_tokens,
                          max_queue=args.max_queue, request_timeout_s=args.timeout, max_batch=args.max_batch,
                          prefill_chunk=args.prefill_chunk, kv_capacity=args.kv_capacity)
        if args.ray:
            return _ray(args, cfg)
        gen = Generator(args.artifact, threads=args.threads, expected_sha256=args.expected_sha256)
    except SafeSteerError as exc:
        print(f"safesteer-serve: error: {exc}", file=sys.stderr)
        return 2
    app = build_app(gen, args.model_name or Path(args.artifact).resolve().name, cfg)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _ray(args: argparse.Namespace, cfg: ServeConfig) -> int:
    import importlib.util
    import sys

    from safesteer_runtime.manifest import load_manifest

    from . import serve_ray

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print("safesteer-serve --ray needs the serve-ray extra: pip install 'safesteer[serve-ray]'", file=sys.stderr)
        return 2
    load_manifest(args.artifact, verify_files=False)  # a bad path fails here, before Ray starts
    serve_ray.run(args.artifact, host=args.host, port=args.port, replicas=args.replicas, threads=args.threads,
                  model_name=args.model_name, cfg=cfg, expected_sha256=args.expected_sha256)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
