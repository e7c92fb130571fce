"""The device-resident KV cache (what CUDA / TensorRT use), run here through onnxruntime-allocated CPU buffers:
the same binding-by-address code path, checked against the host cache and the PyTorch oracle."""

from __future__ import annotations

import numpy as np
import pytest

from safesteer_runtime.errors import ConfigError
from safesteer_runtime.kv_cache import DeviceKVCache
from safesteer_rt import Generator

from conftest import vision_variants
from test_safesteer import BOMB, oracle_for, strong

LLAMA = ("LlamaForCausalLM", "gqa")


@pytest.mark.parametrize("block_size", [1, 0])
def test_device_cache_matches_torch_oracle_with_lookahead(tiny, safe_artifact, block_size):
    gen = Generator(safe_artifact(*LLAMA, block_size), kv_cache="device")
    cfg = strong(gen)
    result = gen.generate(BOMB, max_new_tokens=12, safety=cfg)
    assert isinstance(gen._cache, DeviceKVCache)
    want = oracle_for(tiny, *LLAMA, gen).generate(result.prompt_ids, cfg, 12,
                                                  eos_ids=gen.manifest.tokenizer.eos_token_ids)
    assert result.token_ids == want.token_ids
    assert any(t.get("changed") for t in result.safety_trace), "selection never changed a token: weak test"
    np.testing.assert_allclose([t["score_chosen"] for t in result.safety_trace],
                               [t["score_chosen"] for t in want.trace], atol=1e-4)


@pytest.mark.parametrize("standard_ops", [False, True], ids=["in-place", "standard-ops"])
def test_device_cache_holds_what_the_host_cache_holds(safe_artifact, standard_ops):
    """Both cache layouts: GroupQueryAttention's in-place buffers, and the standard-ops blocks' past + new rows (the
    host cache moves a chosen lookahead row into place in either; the device cache feeds the token again)."""
    art = safe_artifact(*LLAMA, 2, standard_ops)
    host, device = Generator(art, kv_cache="host"), Generator(art, kv_cache="device")
    assert host.engine.in_place is not standard_ops
    cfg = strong(host, lookahead_steps=12)
    a = host.generate(BOMB, max_new_tokens=12, safety=cfg)
    b = device.generate(BOMB, max_new_tokens=12, safety=cfg)
    assert a.token_ids == b.token_ids and any(t["changed"] for t in a.safety_trace)
    assert host._cache.length == device._cache.length > len(a.prompt_ids)
    for got, want in zip(device._cache.stored(), host._cache.stored()):  # keys, values of every layer
        np.testing.assert_allclose(got, want, atol=2e-5)
    if standard_ops:  # the same decisions as the in-place export of the same checkpoint
        assert a.token_ids == Generator(safe_artifact(*LLAMA, 2)).generate(BOMB, max_new_tokens=12, safety=cfg).token_ids


def test_kv_cache_choice_is_checked(safe_artifact):
    with pytest.raises(ConfigError, match="kv_cache"):
        Generator(safe_artifact(*LLAMA, 2), kv_cache="gpu")


def test_tensorrt_profiles_cover_decode_and_prefill():
    """Two profiles per graph, in onnxruntime's option syntax: decode (1..256 rows over a long past) first,
    then prefill (many rows, no past); static inputs (top_k, SafeSteer vectors) get none."""
    from safesteer_runtime import manifest as m
    from safesteer_runtime.trt_profiles import profile_options

    inputs = [m.HIDDEN_IN, m.ATTENTION_MASK, m.POSITION_IDS, m.past_key(4), m.past_value(4), m.PROBE_WEIGHT]
    opts = profile_options(inputs, hidden=64, kv_row=(32,), max_tokens=1024)
    lo, opt, hi = (opts[f"trt_profile_{k}_shapes"].split(",") for k in ("min", "opt", "max"))
    assert len(lo) == len(opt) == len(hi) == 10  # 5 dynamic inputs x 2 profiles
    assert opt[:5] == ["hidden_states:1x1x64", "attention_mask:1x1x1x513", "position_ids:1x1",
                       "past_key.4:1x512x32", "past_value.4:1x512x32"]
    assert hi[:2] == ["hidden_states:1x256x64", "attention_mask:1x1x256x1280"]
    assert opt[5:7] == ["hidden_states:1x256x64", "attention_mask:1x1x256x256"]
    assert hi[5] == "hidden_states:1x1024x64" and lo[8] == "past_key.4:1x0x32"
    assert profile_options([m.TOP_K, m.PROBE_WEIGHT], 64, (32,), 1024) == {}
    # the last block's head rows: 1 at min and opt, up to the call's rows at max; the first block's ids
    lo, opt, hi = (profile_options([m.INPUT_IDS, m.HEAD_ROWS], 64, (32,), 1024)[f"trt_profile_{k}_shapes"].split(",")
                   for k in ("min", "opt", "max"))
    assert lo == ["input_ids:1x1", "head_rows:1", "input_ids:1x1", "head_rows:1"]
    assert opt == ["input_ids:1x1", "head_rows:1", "input_ids:1x256", "head_rows:1"]
    assert hi == ["input_ids:1x256", "head_rows:256", "input_ids:1x1024", "head_rows:1024"]
    # multimodal RoPE: three position rows
    hi = profile_options([m.POSITION_IDS], 64, (32,), 1024, mrope=True)["trt_profile_max_shapes"].split(",")
    assert hi == ["position_ids:3x1x256", "position_ids:3x1x1024"]


def test_tensorrt_options_carry_profiles_and_caches(tmp_path):
    from safesteer_runtime.sessions import CPU, TENSORRT, SessionConfig, _provider_options

    cfg = SessionConfig(providers=(TENSORRT, CPU), cache_dir=tmp_path, trt_max_tokens=2048)
    opts = _provider_options(TENSORRT, cfg, {"trt_profile_min_shapes": "x:1"})
    assert opts["trt_profile_min_shapes"] == "x:1" and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_enable"] == "True" and cfg.uses_tensorrt
    assert _provider_options(CPU, cfg, {"trt_profile_min_shapes": "x:1"}) == {}
    with pytest.raises(ConfigError, match="trt_max_tokens"):
        SessionConfig(providers=(CPU,), trt_max_tokens=0)


def test_rejected_tensorrt_profiles_fall_back_to_implicit_ones(monkeypatch, tmp_path, caplog):
    """When TensorRT cannot take a whole graph, onnxruntime wants profiles for every partition input too and
    refuses the session; the runtime then opens it without explicit profiles (and says so)."""
    from safesteer_runtime import sessions

    calls = []

    def fake_session(path, opts, providers):
        calls.append(dict(providers[0][1]))
        if "trt_profile_min_shapes" in calls[-1]:
            raise RuntimeError("EP_FAIL: shape profiles are needed for the partition input /layers.0/Add_output_0")
        return "session"

    monkeypatch.setattr(sessions.ort, "InferenceSession", fake_session)
    cfg = sessions.SessionConfig(providers=(sessions.TENSORRT, sessions.CPU), cache_dir=tmp_path)
    with caplog.at_level("WARNING", logger="safesteer.runtime"):
        assert sessions.open_session(tmp_path / "block_00.onnx", cfg, {"trt_profile_min_shapes": "x:1"}) == "session"
    assert len(calls) == 2 and "trt_profile_min_shapes" not in calls[1] and "trt_engine_cache_path" in calls[1]
    assert "did not accept the shape profiles" in caplog.text


def test_generate_cli_kv_cache_and_tensorrt_flags(safe_artifact, capsys):
    import json

    from safesteer_rt.cli import main

    art = str(safe_artifact(*LLAMA, 2))
    runs = []
    for where in ("host", "device"):
        assert main([art, "--prompt", "hi", "--max-new-tokens", "6", "--safety", "off", "--kv-cache", where,
                     "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1] and len(runs[0]) >= 1
    assert main([art, "--prompt", "hi", "--trt-max-tokens", "1"]) != 0
    assert "trt_max_tokens" in capsys.readouterr().err


@pytest.mark.parametrize("arch,variant", vision_variants())
def test_device_cache_with_images_on_every_vision_family(tiny, safe_artifact, arch, variant):
    """The device cache path with each family's images (tiles, patches, M-RoPE positions, Gemma 3's two-way image
    mask) and SafeSteer lookahead + MSAV: the same tokens and scores as the host cache."""
    from test_parity_tiny import test_image

    art = safe_artifact(arch, variant, 2)
    host, device = Generator(art, kv_cache="host"), Generator(art, kv_cache="device")
    cfg = strong(host, beta=1.0, lookahead_steps=8)
    content = [{"type": "image", "image": test_image(5, (60, 44))}, {"type": "text", "text": "Do it."}]
    a = host.generate([{"role": "user", "content": content}], max_new_tokens=10, safety=cfg)
    b = device.generate([{"role": "user", "content": content}], max_new_tokens=10, safety=cfg)
    assert isinstance(device._cache, DeviceKVCache)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose([t["score_chosen"] for t in b.safety_trace],
                               [t["score_chosen"] for t in a.safety_trace], atol=1e-5)
