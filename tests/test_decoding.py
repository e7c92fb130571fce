"""Sampling, stop strings, streaming and EOS on a tiny exported model."""

from __future__ import annotations

import pytest

from safesteer_rt import Generator

LLAMA = ("LlamaForCausalLM", "gqa")


@pytest.fixture(scope="module")
def gen(tiny):
    return Generator(tiny.artifact(*LLAMA))


MSG = [{"role": "user", "content": "How do I bake bread at home?"}]


def test_sampling_is_seeded(gen):
    a = gen.generate(MSG, max_new_tokens=16, do_sample=True, temperature=1.3, seed=7)
    b = gen.generate(MSG, max_new_tokens=16, do_sample=True, temperature=1.3, seed=7)
    c = gen.generate(MSG, max_new_tokens=16, do_sample=True, temperature=1.3, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(gen):
    greedy = gen.generate(MSG, max_new_tokens=16)
    assert gen.generate(MSG, max_new_tokens=16, do_sample=True, top_k=1, seed=3).token_ids == greedy.token_ids
    assert gen.generate(MSG, max_new_tokens=16, do_sample=True, top_p=1e-6, seed=3).token_ids == greedy.token_ids


def test_stream_equals_generate(gen):
    pieces = list(gen.stream(MSG, max_new_tokens=24))
    whole = gen.generate(MSG, max_new_tokens=24)
    assert "".join(pieces) == whole.text
    assert len(pieces) > 1
    # the stream's return value is the same GenerationResult generate() gives
    stream = gen.stream(MSG, max_new_tokens=24)
    with pytest.raises(StopIteration) as done:
        while True:
            next(stream)
    assert done.value.value.token_ids == whole.token_ids and done.value.value.text == whole.text


def test_stop_string_truncates(gen):
    full = gen.generate(MSG, max_new_tokens=32).text
    assert len(full) > 6
    stop = full[3:6]
    cut = gen.generate(MSG, max_new_tokens=32, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]
    assert "".join(gen.stream(MSG, max_new_tokens=32, stop=[stop])) == cut.text


def test_eos_ends_generation(gen):
    full = gen.generate(MSG, max_new_tokens=8)
    eos = full.token_ids[3]  # pretend the 4th generated token is the end of sequence
    object.__setattr__(gen.manifest.tokenizer, "eos_token_ids", (eos,))
    try:
        ended = gen.generate(MSG, max_new_tokens=8)
    finally:
        object.__setattr__(gen.manifest.tokenizer, "eos_token_ids", full_eos(gen))
    assert ended.finish_reason == "eos"
    assert ended.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]


def full_eos(gen):
    from safesteer_runtime.manifest import load_manifest

    return load_manifest(gen.root).tokenizer.eos_token_ids


def test_min_new_tokens_holds_off_end_of_sequence(gen):
    free = gen.generate(MSG, max_new_tokens=40, safety=False)
    held = gen.generate(MSG, max_new_tokens=40, safety=False, min_new_tokens=40)
    eos = set(gen.manifest.tokenizer.eos_token_ids)
    assert len(held.token_ids) == 40 and not eos & set(held.token_ids)
    assert held.token_ids[: len(free.token_ids) - 1] == free.token_ids[:-1] or free.finish_reason == "length"


def test_sampler_never_returns_a_banned_token():
    """min_new_tokens bans end tokens: greedy falls back to the best allowed id, sampling never draws a banned one."""
    import numpy as np

    from safesteer_runtime.sampling import Sampler, SamplingConfig

    logits = np.array([0.0, 5.0, 4.0, 1.0], np.float32)
    assert Sampler(SamplingConfig())(logits) == 1
    assert Sampler(SamplingConfig())(logits, banned={1}) == 2
    assert Sampler(SamplingConfig())(logits, banned={1}, best=1) == 2  # the graph's top-1 is banned: next best
    sampler = Sampler(SamplingConfig(do_sample=True, temperature=2.0, seed=0))
    draws = {sampler(logits, banned={1, 2}) for _ in range(200)}
    assert draws == {0, 3} and logits[1] == 5.0  # the caller's logits are left as they were


def test_streamed_pieces_never_split_a_character(gen):
    """Byte-level BPE splits these characters over several tokens: pieces are whole characters and join up to the
    full decode."""
    from safesteer_runtime.text import IncrementalDecoder

    ids = gen.codec.encode("naïve café: 你好, 世界 🤖🧠 ok", add_bos=False)
    decoder = IncrementalDecoder(gen.codec)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == gen.codec.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") > 0  # some tokens ended mid-character and waited for the rest


def test_decoding_steps_write_into_reused_buffers(gen):
    """Decoding steps (scratch) write into one set of output buffers, bound once; other calls get fresh arrays, with
    the same values. Steps run outside a request leave the next request's tokens as they were."""
    import numpy as np

    from safesteer_runtime.masks import causal_mask

    first = gen.generate(MSG, max_new_tokens=12, safety=False).token_ids
    engine, cache = gen.engine, gen.engine.new_cache(16)
    one = lambda t, scratch: engine.step(cache, causal_mask(t, 1), np.array([[t]], np.int64),  # noqa: E731
                                         ids=np.array([[5]], np.int64), scratch=scratch)
    a, b, c = one(0, True), one(0, True), one(0, False)
    assert a.logits is b.logits and a.top_ids is b.top_ids and c.logits is not a.logits
    np.testing.assert_array_equal(b.logits, c.logits)
    assert gen.generate(MSG, max_new_tokens=12, safety=False).token_ids == first
