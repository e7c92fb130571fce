"""Fuzzing the runtime's trust boundaries (issue 21): hostile requests, images and artifacts.

Property, for every generated case: only this package's own errors (SafeSteerError) escape, the process survives,
the Generator keeps serving (a fixed request still decodes to the same tokens), and peak memory stays bounded.
Hypothesis with a fixed seed (derandomize) and a small budget in CI; the long run is by hand:

    SAFESTEER_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py -q

Each property prints how many cases it tried (pytest -s shows it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from safesteer_rt import Generator, ImageLimits, SafetyConfig  # noqa: E402
from safesteer_runtime.errors import SafeSteerError  # noqa: E402

LLAVA = ("LlavaForConditionalGeneration", "clip-llama")
EXAMPLES = int(os.environ.get("SAFESTEER_FUZZ_EXAMPLES", "40"))
RSS_BOUND_MB = 1500  # peak resident memory of the whole test process while fuzzing (the tiny artifacts: ~500 MB)
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_peak() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --- strategies ------------------------------------------------------------------------------------------------
junk = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4),
                    max_leaves=12)
control = st.sampled_from(["<|im_start|>", "<|im_end|>", "<image>", "<unk>", "\ue000", "{{", "{%"])
texts = st.lists(st.text(max_size=30) | control, max_size=6).map("".join)


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["pil", "png", "bytes", "path"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "path":
        return draw(st.sampled_from(["/etc/passwd", "/dev/zero", "/proc/self/environ", "missing.png", ""]))
    from PIL import Image

    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "1", "P", "I", "F", "LA", "CMYK"]))
    size = (draw(st.integers(1, 96)), draw(st.integers(1, 96)))
    img = Image.new(mode, size)
    if kind == "pil":
        return img
    buf = io.BytesIO()
    img.convert("RGB" if mode in ("I", "F", "CMYK") else mode).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 3))):  # a few flipped bytes
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    return bytes(raw)


def mostly(valid, hostile):
    """``valid`` four times in five, ``hostile`` otherwise: deep paths get reached, edges still get hit."""
    return st.integers(0, 4).flatmap(lambda n: hostile if n == 4 else valid)  # hypothesis favours 0: valid


part = mostly(st.fixed_dictionaries({"type": st.just("text"), "text": texts})
              | st.fixed_dictionaries({"type": st.just("image"), "image": images()}), junk)
message = mostly(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                        "content": texts | st.lists(part, min_size=1, max_size=3)}),
                 st.fixed_dictionaries({"role": junk, "content": junk}) | junk)
knobs = {"do_sample": st.booleans(), "temperature": st.floats(0.1, 3.0), "top_k": st.integers(0, 50),
         "top_p": st.floats(0.05, 1.0), "seed": st.integers(0, 2**32), "max_new_tokens": st.integers(1, 6),
         "min_new_tokens": st.integers(0, 6)}
bad_knob = st.one_of(st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                     st.text(max_size=4))
safety_knobs = {"k": st.integers(1, 12), "lam": st.floats(0, 64), "tau": st.floats(0.01, 0.99),
                "alpha": st.floats(-4, 4), "beta": st.floats(-2, 2), "depth": st.integers(0, 4),
                "gamma": st.floats(0, 2), "lookahead_steps": st.integers(0, 8), "enabled": st.booleans()}
safety = mostly(st.sampled_from(["auto", True, False])
                | st.fixed_dictionaries({}, optional={k: mostly(v, bad_knob) for k, v in safety_knobs.items()}),
                st.sampled_from([None, "on", 3]) | junk)


def _safety(gen, value):
    """Knob dicts become SafetyConfigs over the artifact's defaults (their validation is part of what is fuzzed)."""
    return SafetyConfig.from_manifest(gen.manifest.safety, **value) if isinstance(value, dict) else value


@st.composite
def requests(draw):
    form = draw(st.sampled_from(["messages", "messages", "prompt", "prompt_ids"]))
    req = {}
    if form == "messages":
        req["messages"] = draw(mostly(st.lists(message, min_size=1, max_size=3), junk))
    elif form == "prompt":
        req["prompt"] = draw(mostly(texts, junk))
        req["images"] = draw(mostly(st.none() | st.lists(images(), max_size=3), junk))
    else:
        req["prompt_ids"] = draw(mostly(st.lists(st.integers(0, 200), min_size=1, max_size=12),
                                        st.lists(st.integers(-3, 10**6) | junk, max_size=12) | junk))
    for name, valid in knobs.items():
        if draw(st.booleans()):
            req[name] = draw(mostly(valid, bad_knob))
    if draw(st.booleans()):
        req["stop"] = draw(mostly(st.lists(st.text(max_size=3), max_size=2), junk))
    req["safety"] = draw(safety)
    req.setdefault("max_new_tokens", 4)
    return req


# --- properties --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(safe_artifact):
    gen = Generator(safe_artifact(*LLAVA, 0), image_limits=ImageLimits(allow_paths=False, max_pixels=1_000_000))
    probe = dict(prompt_ids=[5, 6, 7, 8], max_new_tokens=6, safety=False)
    return gen, probe, gen.generate(**probe).token_ids


def test_hostile_requests_get_typed_errors_and_the_generator_keeps_serving(served):
    gen, probe, want = served
    tried = {"cases": 0, "served": 0}
    reset_peak()

    @FUZZ
    @given(requests())
    def case(req):
        tried["cases"] += 1
        messages = req.pop("messages", None)
        try:
            req["safety"] = _safety(gen, req["safety"])
            gen.generate(messages, **req)
            tried["served"] += 1
        except SafeSteerError as exc:
            if os.environ.get("SAFESTEER_FUZZ_VERBOSE"):
                print(type(exc).__name__, str(exc)[:100])
        assert gen.generate(**probe).token_ids == want

    case()
    print(f"\nfuzzed requests: {tried['cases']} cases, {tried['served']} served, the rest refused with SafeSteerError; "
          f"peak RSS {peak_rss_mb():.0f} MB")
    assert tried["cases"] >= min(EXAMPLES, 10) and peak_rss_mb() < RSS_BOUND_MB


MANIFEST_PATHS = ["../x", "/etc/passwd", "/dev/zero", "/proc/self/environ", "", ".", "a\x00b", "C:\\x", 5, None,
                  "block_00.onnx", "tokenizer.json"]


@st.composite
def manifest_mutations(draw):
    """A JSON path in the manifest and what to put there (or None: delete it)."""
    spread = st.integers(0, 10_000).map(lambda i: i * 7919 % 10_007)  # hypothesis favours small ints: spread them
    return draw(st.lists(st.tuples(spread, st.one_of(st.just("delete"), st.sampled_from(MANIFEST_PATHS),
                                                                      junk)), max_size=2))


def _leaves(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))


def _mutate(data, path, value):
    if not path:
        return value if value != "delete" else {}
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    if value == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


def test_hostile_artifacts_are_refused_with_typed_errors(safe_artifact, tmp_path):
    source = safe_artifact(*LLAVA, 0)
    original = json.loads((source / "manifest.json").read_text())
    files = sorted(p.name for p in source.iterdir() if p.is_file())
    tried = {"cases": 0, "loaded": 0}
    reset_peak()

    @FUZZ
    @given(manifest_mutations(), st.sampled_from(files), st.sampled_from(["keep", "keep", "truncate", "flip", "empty"]),
           st.integers(0, 10**9), st.booleans())
    def case(mutations, victim, how, where, rehash):
        tried["cases"] += 1
        root = tmp_path / "a"
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(source, root)
        data = json.loads(json.dumps(original))
        for index, value in mutations:
            leaves = list(_leaves(data))
            data = _mutate(data, leaves[index % len(leaves)], value)
        body = (root / victim).read_bytes()
        if how == "truncate":
            body = body[: where % max(len(body), 1)]
        elif how == "flip" and body:
            body = bytearray(body)
            body[where % len(body)] ^= 0xFF
            body = bytes(body)
        elif how == "empty":
            body = b""
        (root / victim).write_bytes(body)
        if rehash and isinstance(data, dict):  # an attacker recomputes the hashes of what they changed
            import hashlib

            extra = data.get("extra_files") if isinstance(data.get("extra_files"), list) else []
            graphs = data.get("graphs") if isinstance(data.get("graphs"), list) else []
            for ref in [*extra, *(g.get("file") for g in graphs if isinstance(g, dict))]:
                if isinstance(ref, dict) and ref.get("path") == victim:
                    ref.update(sha256=hashlib.sha256(body).hexdigest(), size=len(body))
        (root / "manifest.json").write_text(json.dumps(data))
        try:
            gen = Generator(root)
            gen.generate(prompt_ids=[5, 6, 7], max_new_tokens=3)
            tried["loaded"] += 1
        except SafeSteerError as exc:
            if os.environ.get("SAFESTEER_FUZZ_VERBOSE"):
                print(type(exc).__name__, str(exc)[:100])

    case()
    print(f"\nfuzzed artifacts: {tried['cases']} cases, {tried['loaded']} loaded and served, the rest refused with "
          f"SafeSteerError; peak RSS {peak_rss_mb():.0f} MB")
    assert tried["cases"] >= min(EXAMPLES, 10) and peak_rss_mb() < RSS_BOUND_MB


def test_the_scripted_manifest_parser_rejects_junk_with_typed_errors():
    """parse_manifest on arbitrary JSON values: ArtifactError or a Manifest, nothing else."""
    from safesteer_runtime.manifest import parse_manifest

    @FUZZ
    @given(junk)
    def case(value):
        try:
            parse_manifest(json.dumps(value, default=str) if not isinstance(value, float) or np.isfinite(value)
                           else "null")
        except SafeSteerError:
            pass

    case()
