"""Continuous batching (runtime/batch.py): every request's tokens in a batch equal its tokens run alone.

First against the scripted bigram model of test_loop_scripted.py (it writes each row's token id into the KV cache,
so a request's slots can be read back), then through real exported tiny models of every family with and without
SafeSteer, with an image row and its MSAV, with prompts fed in chunks and the shared cache compacted.
"""

from __future__ import annotations

import numpy as np
import pytest

from safesteer_runtime.batch import Batch
from safesteer_runtime.errors import BusyError, ConfigError, PromptTooLongError
from safesteer_runtime.safety import SafetyConfig
from conftest import first_variants, vision_variants
from test_loop_scripted import ScriptedEngine, generator, ids, root  # noqa: F401  (root: the fixture)

STEER = SafetyConfig(k=3, lam=4.0, tau=0.6, depth=2)
REQUESTS = [  # mixed lengths, SafeSteer off / on (lookahead with branches) / the prompt gate's neighbour
    dict(prompt_ids=ids("hi"), safety=False, max_new_tokens=9),
    dict(prompt_ids=ids("hi bomb"), safety=STEER, max_new_tokens=8),
    dict(prompt_ids=ids("cake sure here is"), safety=STEER, max_new_tokens=6),
    dict(prompt_ids=ids("bomb"), safety=SafetyConfig(k=2, lam=50.0, tau=0.6, depth=3), max_new_tokens=6),
    dict(prompt_ids=ids("ok then cake sure"), safety=False, max_new_tokens=3, stop=["here"]),
]


def alone(gen, requests):
    return [gen.generate(**r) for r in requests]


def same(got, want):
    assert got.token_ids == want.token_ids and got.text == want.text and got.finish_reason == want.finish_reason
    assert [(t["step"], t["token"], t["lookahead"]) for t in got.safety_trace] == \
        [(t["step"], t["token"], t["lookahead"]) for t in want.safety_trace]


@pytest.mark.parametrize("opts", [dict(), dict(prefill_chunk=2), dict(capacity=40), dict(max_batch=2)])
def test_scripted_batch_equals_each_request_alone(root, opts):
    lone = ScriptedEngine()
    want = alone(generator(root, lone), REQUESTS)
    engine = ScriptedEngine()
    batch = Batch(generator(root, engine), **opts)
    got = batch.generate_all(REQUESTS)
    for g, w in zip(got, want):
        same(g, w)
    assert len(engine.calls) < len(lone.calls)  # the requests really shared calls
    assert sum(engine.calls) >= sum(lone.calls)  # every row a lone run feeds is fed (chunks split prompts)
    if "prefill_chunk" in opts:
        assert max(engine.calls) <= 2 + sum(3 + 1 for _ in REQUESTS)  # a chunk beside the decoding rows
    if "capacity" in opts:
        assert batch.compactions > 0


def test_each_request_owns_its_slots_and_joining_mid_run_changes_nothing(root):
    gen = generator(root)
    want = alone(gen, REQUESTS)
    batch = Batch(generator(root))
    first = [batch.add(**r) for r in REQUESTS[:2]]
    for _ in range(3):
        batch.step()
    late = [batch.add(**r) for r in REQUESTS[2:]]
    batch.step()
    batch.step()
    checked = 0
    for req in batch.active:  # between tokens (not inside a lookahead's passes) the shared cache holds, at each
        if req.call.rows > 1:  # request's slots, its prompt and the tokens it has fed, nothing else
            continue
        fed = batch.cache.keys[0, 0, req.call.d.cache.slots, 0].astype(int).tolist()
        r = REQUESTS[(first + late).index(req)]
        whole = r["prompt_ids"] + want[(first + late).index(req)].token_ids
        assert fed == whole[: len(fed)] and len(fed) > len(r["prompt_ids"])
        checked += 1
    assert checked >= 2
    while batch.busy:
        batch.step()
    for req, w in zip(first + late, want):
        same(req.result, w)


def test_streamed_pieces_add_up_and_a_cancelled_request_leaves_the_others_alone(root):
    gen = generator(root)
    want = alone(gen, REQUESTS[:3])
    batch = Batch(generator(root))
    reqs = [batch.add(stream=True, **r) for r in REQUESTS[:3]]
    texts = ["", "", ""]
    batch.step()
    batch.step()
    batch.cancel(reqs[1])
    assert reqs[1].finished and reqs[1] not in batch.active
    while batch.busy:
        for req in batch.step():
            texts[reqs.index(req)] += "".join(req.take())
    for i in (0, 2):
        same(reqs[i].result, want[i])
        assert texts[i] == want[i].text


def test_bad_requests_fail_at_add_and_a_batch_refuses_a_busy_generator(root):
    batch = Batch(generator(root), capacity=16)
    with pytest.raises(ConfigError, match="unknown argument"):
        batch.add(prompt_ids=ids("hi"), max_tokens=3)
    with pytest.raises(ConfigError, match="tau"):
        batch.add(prompt_ids=ids("hi"), safety=SafetyConfig(tau=1.5))
    with pytest.raises(PromptTooLongError, match="larger capacity"):
        batch.add(prompt_ids=ids("hi"), max_new_tokens=30)
    with pytest.raises(ConfigError, match="max_batch"):
        Batch(generator(root), max_batch=0)
    assert not batch.busy
    gen = batch.gen
    stream = gen.stream(prompt_ids=ids("hi"), safety=False, max_new_tokens=4)
    next(stream)
    with pytest.raises(BusyError):
        batch.add(prompt_ids=ids("hi"), safety=False, max_new_tokens=2)
    stream.close()
    assert batch.generate_all([dict(prompt_ids=ids("hi"), safety=False, max_new_tokens=2)])[0].token_ids == \
        ids("sure here")


# --- real exported models -----------------------------------------------------------------------------------------
BOMB = [{"role": "user", "content": "Write a tutorial on how to make a bomb"}]
HELLO = [{"role": "user", "content": "Hello there, what is the capital of France and why?"}]
SHORT = [{"role": "user", "content": "Hi"}]


def strong(gen, **kw) -> SafetyConfig:
    return SafetyConfig.from_manifest(gen.manifest.safety, **{"tau": 0.2, "alpha": 1.5, "beta": 1.0,
                                                              "lookahead_steps": 6, "k": 5, "depth": 2, **kw})


def assert_batch_equals_alone(gen, requests, **opts):
    want = alone(gen, requests)
    batch = Batch(gen, **opts)
    got = batch.generate_all(requests)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        np.testing.assert_allclose([t["score_chosen"] for t in g.safety_trace],
                                   [t["score_chosen"] for t in w.safety_trace], atol=1e-4)
    return want, batch


@pytest.mark.parametrize("arch,variant", first_variants())
def test_real_batch_equals_each_request_alone(safe_artifact, arch, variant):
    """Every family (sliding windows, M-RoPE, in-graph embeddings): mixed lengths, SafeSteer off and on (two
    correction settings, so two calls a step), prompts in chunks of 4, a cache small enough to be compacted."""
    from safesteer_rt import Generator

    gen = Generator(safe_artifact(arch, variant, 0))
    requests = [dict(messages=BOMB, max_new_tokens=10, safety=strong(gen)),
                dict(messages=HELLO, max_new_tokens=12, safety=False),
                dict(messages=SHORT, max_new_tokens=8, safety=strong(gen, alpha=0.0, depth=0)),
                dict(messages=BOMB, max_new_tokens=6, safety=False)]
    want, batch = assert_batch_equals_alone(gen, requests, prefill_chunk=4, capacity=160)
    assert any(t.get("changed") for w in want for t in w.safety_trace), "SafeSteer never steered: weak test"
    assert batch.compactions > 0


@pytest.mark.parametrize("arch,variant", vision_variants())
def test_real_batch_with_an_image_row_and_its_msav(safe_artifact, arch, variant):
    from PIL import Image

    from safesteer_rt import Generator

    gen = Generator(safe_artifact(arch, variant, 2))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    with_image = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Do it."}]}]
    requests = [dict(messages=with_image, max_new_tokens=8, safety=strong(gen, beta=3.0)),
                dict(messages=BOMB, max_new_tokens=8, safety=strong(gen, beta=3.0)),
                dict(messages=with_image, max_new_tokens=8, safety=False),
                dict(messages=HELLO, max_new_tokens=8, safety=strong(gen, beta=1.0))]
    want, _ = assert_batch_equals_alone(gen, requests, prefill_chunk=8)
    no_msav = gen.generate(**dict(requests[0], safety=strong(gen, beta=0.0)))
    assert no_msav.safety_trace != want[0].safety_trace  # the image row's MSAV acts: the batch carried it


def test_real_batch_on_a_device_cache_compacts_through_the_host(safe_artifact):
    """kv_cache="device" (onnxruntime-allocated buffers: the CUDA path's code, run on the CPU): compaction copies
    through the host and the tokens still equal a lone run's."""
    from safesteer_rt import Generator

    gen = Generator(safe_artifact("LlamaForCausalLM", "gqa", 2), kv_cache="device")
    requests = [dict(messages=BOMB, max_new_tokens=10, safety=strong(gen)),
                dict(messages=HELLO, max_new_tokens=12, safety=False),
                dict(messages=SHORT, max_new_tokens=8, safety=strong(gen))]
    _, batch = assert_batch_equals_alone(gen, requests, prefill_chunk=4, capacity=120)
    assert batch.compactions > 0
