"""Execution-provider choice and onnxruntime session creation."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import onnxruntime as ort
from onnxruntime.capi import _pybind_state as ort_c

from .errors import ArtifactError, ConfigError

log = logging.getLogger("safesteer.runtime")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
AUTO_ORDER = (TENSORRT, CUDA, CPU)
THREAD_POOLS = ("auto", "shared", "per-graph")

Providers = Union[str, Sequence[str]]


@dataclass(frozen=True)
class SessionConfig:
    providers: tuple[str, ...]
    intra_op_threads: int = 0  # 0 = onnxruntime's default (one per physical core)
    cache_dir: Optional[Path] = None  # TensorRT engine + timing caches
    trt_max_tokens: int = 4096  # positions the TensorRT profiles cover (prompt + new tokens)
    shared_pool: bool = False  # the sessions run on onnxruntime's process-wide intra-op pool (use_shared_pool)
    huge_pages: bool = True  # weights in host memory moved onto transparent huge pages after loading (huge_pages.py)

    def __post_init__(self):
        if self.intra_op_threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = onnxruntime default), got {self.intra_op_threads}")
        if not isinstance(self.trt_max_tokens, int) or self.trt_max_tokens < 2:
            raise ConfigError(f"trt_max_tokens must be an integer >= 2, got {self.trt_max_tokens!r}")
        if not isinstance(self.huge_pages, bool):
            raise ConfigError(f"huge_pages must be True or False, got {self.huge_pages!r}")

    @property
    def uses_tensorrt(self) -> bool:
        return TENSORRT in self.providers


IN_PLACE_ON_GPU = (
    "this artifact keeps its KV cache in place through onnxruntime's GroupQueryAttention, which the CUDA provider "
    "runs only in float16 / bfloat16 (its float32 graph would fall back to the CPU with the cache on the GPU); "
    "re-export it with `safesteer-export --standard-ops` for CUDA / TensorRT")


def resolve_providers(providers: Providers = "auto", in_place_cache: bool = False) -> tuple[str, ...]:
    """'auto' = TensorRT, then CUDA, then CPU, keeping those this onnxruntime build has. ``in_place_cache``: the
    artifact's blocks use GroupQueryAttention over float32 cache buffers, which only the CPU provider runs: 'auto'
    then means the CPU (with a warning when a GPU provider was there) and naming a GPU provider is an error."""
    available = ort.get_available_providers()
    if providers == "auto":
        names = tuple(p for p in AUTO_ORDER if p in available)
        if in_place_cache and names != (CPU,):
            log.warning("running on the CPU: %s", IN_PLACE_ON_GPU)
            return (CPU,)
        return names
    names = [providers] if isinstance(providers, str) else list(providers)
    if not names:
        raise ConfigError("providers must be 'auto' or a non-empty list of execution provider names")
    missing = [p for p in names if p not in available]
    if missing:
        raise ConfigError(
            f"execution provider(s) {missing} are not available in this onnxruntime build (available: {available}). "
            "For CUDA/TensorRT install safesteer[gpu] (onnxruntime-gpu) *instead of* safesteer[cpu]."
        )
    if in_place_cache and set(names) - {CPU}:
        raise ConfigError(f"cannot run on {[p for p in names if p != CPU]}: {IN_PLACE_ON_GPU}")
    if CPU not in names:
        names.append(CPU)  # nodes a GPU provider cannot take fall back to the CPU
    return tuple(names)


# onnxruntime's process-wide ("global") intra-op pool can be made once per process, and once it exists onnxruntime
# refuses sessions with pools of their own. Its size once made here (-1: made by someone else in the process).
_shared_threads: Optional[int] = None
_shared_lock = threading.Lock()


def use_shared_pool(choice: str, cfg: SessionConfig) -> bool:
    """Whether a Generator's sessions run on onnxruntime's process-wide intra-op thread pool instead of one pool per
    graph. Multi-graph artifacts run several graphs per decoding step; with a pool per graph the next graph's workers
    must wake up first (measured: 4-layer blocks of Qwen2.5-Coder-0.5B int4, ~4% per token on a 2-core CPU; one
    graph: no difference). The catch is onnxruntime's: once that pool exists, every session the process opens must
    use it. ``choice``: "shared" (make or join the pool), "per-graph", or "auto" (join the pool if this process has
    one, else per-graph)."""
    global _shared_threads
    if choice not in THREAD_POOLS:
        raise ConfigError(f"thread_pool must be one of {THREAD_POOLS}, got {choice!r}")
    threads = cfg.intra_op_threads
    with _shared_lock:
        if _shared_threads is None:
            if choice != "shared":
                return False
            try:
                ort_c.set_global_thread_pool_sizes(threads, 1)  # inter-op: the graphs run one after another
                _shared_threads = threads
            except Exception as exc:  # the global pools were made elsewhere in the process: join them
                log.info("joining onnxruntime's global thread pool made elsewhere in this process (%s)", exc)
                _shared_threads = -1
            return True
    if choice == "per-graph":
        raise ConfigError("this process already runs onnxruntime on its shared thread pool (a Generator made with "
                          "thread_pool='shared'), and onnxruntime then refuses per-graph pools; use thread_pool='auto'")
    if threads != _shared_threads and _shared_threads != -1:
        log.warning("threads=%d ignored: this process's shared onnxruntime thread pool has %d threads",
                    threads, _shared_threads)
    return True


def _provider_options(name: str, cfg: SessionConfig, trt_profiles: dict[str, str]) -> dict:
    if name != TENSORRT:
        return {}
    opts = dict(trt_profiles)
    if cfg.cache_dir is not None:  # engines and timing caches persist: the next load skips the build
        cache = str(cfg.cache_dir)
        opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
                     "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache})
    return opts


def open_session(path: Path, cfg: SessionConfig, trt_profiles: Optional[dict[str, str]] = None) -> ort.InferenceSession:
    """``trt_profiles``: TensorRT shape profiles for this graph (trt_profiles.profile_options)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cfg.shared_pool:
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = cfg.intra_op_threads
        # Each graph has its own pool: workers spin during a run (fast hand-off between nodes) but stop at its
        # end, so they do not hold the cores another graph's pool needs.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    providers = [(p, _provider_options(p, cfg, trt_profiles or {})) for p in cfg.providers]
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        if not cfg.shared_pool and "global thread pool" in str(exc):
            raise ConfigError("onnxruntime's global thread pool was made elsewhere in this process, so it refuses "
                              "sessions with their own pools; create the Generator with thread_pool='shared'") from exc
        if trt_profiles:  # TensorRT wants profiles for every partition input when it cannot take the whole graph
            log.warning("TensorRT did not accept the shape profiles for %s (%s); retrying with the profiles "
                        "onnxruntime infers from the shapes it sees (engines rebuild when a shape leaves them). "
                        "Artifacts exported with `safesteer-export --standard-ops` give TensorRT whole graphs",
                        path.name, exc)
            return open_session(path, cfg, None)
        if "Unrecognized attribute" in str(exc) or "opset" in str(exc).lower():
            raise ArtifactError(
                f"onnxruntime {ort.__version__} could not load {path.name} ({exc}): the graph uses an operator "
                "version or attribute this onnxruntime does not know; upgrade onnxruntime (safesteer's range: "
                "pyproject.toml) or re-export the artifact with the safesteer version that matches it"
            ) from exc
        raise ArtifactError(
            f"onnxruntime could not load {path.name} ({type(exc).__name__}: {exc}); the file is corrupt "
            "or from an incompatible exporter; re-export the artifact"
        ) from exc
