"""CUDA and TensorRT: what bench/gpu_check.sh runs on a GPU machine (onnxruntime-gpu installed instead of
onnxruntime). Skipped where the providers are missing, as on CPU-only CI.

Each check compares the GPU run with the CPU run of the same artifact (and SafeSteer with the PyTorch oracle):
the KV cache lives in device memory and the lookahead re-feeds its chosen token there. GPU runs take
--standard-ops artifacts (past rows in, new rows out): the default export's in-place GroupQueryAttention has no
float32 CUDA kernel (sessions.resolve_providers refuses it there).
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest

from safesteer_runtime.kv_cache import DeviceKVCache
from safesteer_rt import Generator

from conftest import vision_variants
from test_safesteer import BOMB, oracle_for, strong

AVAILABLE = ort.get_available_providers()
CUDA, TRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"
needs_cuda = pytest.mark.skipif(CUDA not in AVAILABLE, reason="needs onnxruntime-gpu and a CUDA device")
needs_trt = pytest.mark.skipif(TRT not in AVAILABLE, reason="needs onnxruntime-gpu with TensorRT")
pytestmark = pytest.mark.gpu

LLAMA = ("LlamaForCausalLM", "gqa")
MSG = [{"role": "user", "content": "How do I bake bread at home?"}]


@needs_cuda
@pytest.mark.parametrize("block_size", [1, 0])
def test_cuda_greedy_equals_cpu(tiny, block_size):
    art = tiny.artifact(*LLAMA, block_size, standard_ops=True)
    cpu = Generator(art, providers=["CPUExecutionProvider"]).generate(MSG, max_new_tokens=32, safety=False)
    gpu = Generator(art, providers=[CUDA])
    assert set(gpu.providers.values()) == {CUDA}
    out = gpu.generate(MSG, max_new_tokens=32, safety=False)
    assert isinstance(gpu._cache, DeviceKVCache)
    assert out.token_ids == cpu.token_ids


@needs_cuda
@pytest.mark.parametrize("arch,variant", vision_variants())
def test_cuda_images_equal_cpu(tiny, arch, variant):
    """Every family with images on CUDA (vision graph, tiles / patches, M-RoPE, two-way image masks) = the CPU."""
    from test_parity_tiny import test_image

    art = tiny.artifact(arch, variant, 2, standard_ops=True)
    content = [{"type": "image", "image": test_image(5, (60, 44))}, {"type": "text", "text": "What is in it?"}]
    msg = [{"role": "user", "content": content}]
    cpu = Generator(art, providers=["CPUExecutionProvider"]).generate(msg, max_new_tokens=24, safety=False)
    out = Generator(art, providers=[CUDA]).generate(msg, max_new_tokens=24, safety=False)
    assert out.token_ids == cpu.token_ids


@needs_cuda
def test_cuda_safesteer_matches_torch_oracle(tiny, safe_artifact):
    gen = Generator(safe_artifact(*LLAMA, 1, True), providers=[CUDA])
    cfg = strong(gen)
    result = gen.generate(BOMB, max_new_tokens=12, safety=cfg)
    want = oracle_for(tiny, *LLAMA, gen).generate(result.prompt_ids, cfg, 12,
                                                  eos_ids=gen.manifest.tokenizer.eos_token_ids)
    assert result.token_ids == want.token_ids
    assert any(t.get("changed") for t in result.safety_trace)
    np.testing.assert_allclose([t["score_chosen"] for t in result.safety_trace],
                               [t["score_chosen"] for t in want.trace], atol=1e-3)


@needs_cuda
def test_fp16_export_on_cuda(safe_artifact, tmp_path):
    from safesteer_export.quantize import quantize_artifact

    src = safe_artifact(*LLAMA, 2, True)
    quantize_artifact(src, tmp_path / "fp16", "fp16")
    ref = Generator(src, providers=[CUDA]).generate(MSG, max_new_tokens=16, safety=False).token_ids
    half = Generator(tmp_path / "fp16", providers=[CUDA]).generate(MSG, max_new_tokens=16, safety=False).token_ids
    assert sum(a == b for a, b in zip(ref, half)) >= 12


@pytest.fixture(scope="module")
def standard_artifact(tiny, tmp_path_factory):
    """The export TensorRT can take whole: standard ONNX ops only (--standard-ops)."""
    from safesteer_export.pipeline import ExportConfig, export_artifact

    out = tmp_path_factory.mktemp("std") / "art"
    export_artifact(ExportConfig(tiny.checkpoint(*LLAMA), out, block_size=2, safety=False, standard_ops=True))
    return out


@needs_trt
def test_tensorrt_builds_once_and_matches_cpu(standard_artifact, tmp_path):
    art = standard_artifact
    cpu = Generator(art, providers=["CPUExecutionProvider"]).generate(MSG, max_new_tokens=24, safety=False)
    providers, cache = [TRT, CUDA], tmp_path / "trt"
    t0 = time.perf_counter()
    first = Generator(art, providers=providers, engine_cache_dir=cache, trt_max_tokens=512)
    built = time.perf_counter() - t0
    assert TRT in first.providers.values()
    assert first.generate(MSG, max_new_tokens=24, safety=False).token_ids == cpu.token_ids
    assert any(cache.iterdir()), "no TensorRT engine or timing cache was written"
    t0 = time.perf_counter()
    again = Generator(art, providers=providers, engine_cache_dir=cache, trt_max_tokens=512)
    assert time.perf_counter() - t0 < built, "the second load did not come from the engine cache"
    assert again.generate(MSG, max_new_tokens=8, safety=False).token_ids == cpu.token_ids[:8]


@needs_trt
def test_tensorrt_lookahead_rows_use_the_decode_profile(tiny, safe_artifact, tmp_path):
    """K lookahead rows per call (decode profile) and the prompt (prefill profile), against the oracle."""
    gen = Generator(safe_artifact(*LLAMA, 2, True), providers=[TRT, CUDA], engine_cache_dir=tmp_path,
                    trt_max_tokens=512)
    cfg = strong(gen)
    result = gen.generate(BOMB, max_new_tokens=12, safety=cfg)
    want = oracle_for(tiny, *LLAMA, gen).generate(result.prompt_ids, cfg, 12,
                                                  eos_ids=gen.manifest.tokenizer.eos_token_ids)
    assert result.token_ids == want.token_ids
