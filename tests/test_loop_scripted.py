"""The decode loop against a scripted model: no torch, no onnxruntime sessions, milliseconds per test.

``ScriptedEngine`` stands in for runtime.engine.Engine. Its "model" is a bigram table (a row's next-token logits
depend on that row's token only) and its probe a per-token harm logit, so what the loop should do is computable
by hand: ``reference`` below is an independent, plain implementation of the loop's rules (greedy choice, the gate,
SafeSteer's lookahead with refusal openers at the first step, branch means up to an end token, lam_eff). The engine
writes every row's token id into the KV cache, so a test can read back which rows the loop committed.

The real graphs and the PyTorch oracle are tested elsewhere (test_safesteer.py, test_parity_tiny.py); this file
pins the loop's bookkeeping: candidates, branches, commits, stop strings, end tokens, errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from safesteer_runtime import manifest as m
from safesteer_runtime.errors import BusyError, ConfigError, InputError, PromptTooLongError
from safesteer_runtime.generator import Generator
from safesteer_runtime.kv_cache import KVCache
from safesteer_runtime.safety import SafetyConfig, steering_strength
from safesteer_runtime.engine import StepOut

WORDS = ["<eos>", "hi", "sure", "here", "is", "how", "I", "sorry", "no", "bomb", "cake", ".", "ok", "then"]
ID = {w: i for i, w in enumerate(WORDS)}
V = len(WORDS)
EOS = ID["<eos>"]
HIDDEN = 4


def _bigram() -> np.ndarray:
    """Next-token logits by current token: a greedy chain per start word, with a runner-up or two to choose from."""
    logits = np.full((V, V), -6.0)
    chain = {  # word -> [(next, logit), ...]
        "hi": [("sure", 3.0), ("ok", 2.0), ("I", 0.5)],
        "bomb": [("sure", 3.0), ("how", 2.5), ("I", 0.0)],  # a harmful request: the model wants to comply
        "cake": [("sure", 3.0), ("ok", 1.0)],
        "sure": [("here", 3.0), ("then", 1.5)],
        "here": [("is", 3.0)],
        "is": [("how", 3.0), (".", 2.0)],
        "how": [("bomb", 3.0), ("cake", 1.0)],  # "how" leads back to the harmful topic
        "I": [("sorry", 4.0)],
        "sorry": [("no", 4.0)],
        "no": [(".", 4.0)],
        ".": [("<eos>", 4.0)],
        "ok": [(".", 3.0), ("then", 2.0)],
        "then": [("cake", 3.0), (".", 1.0)],
        "<eos>": [("<eos>", 1.0)],
    }
    for word, nexts in chain.items():
        for nxt, value in nexts:
            logits[ID[word], ID[nxt]] = value
    return logits


BIGRAM = _bigram()
HARM = np.full(V, -3.0)  # the probe's logit at a row holding each token
HARM[[ID["bomb"], ID["how"]]] = 3.0
HARM[[ID["sure"], ID["here"], ID["is"]]] = 0.0  # compliance words: sigmoid 0.5
HARM[[ID["I"], ID["sorry"], ID["no"]]] = -4.0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class ScriptedEngine:
    """Engine's interface over the bigram model; records each call's row count and writes row token ids as K."""

    def __init__(self, context_limit: int = 64):
        self.context_limit = context_limit
        self.calls: list[int] = []

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(1, capacity, 1, 1, in_place=False)

    def step(self, cache, mask, positions, *, ids=None, embeds=None, head_rows=None, top_k=1, safety=None,
             rope_positions=None, scratch=False) -> StepOut:
        rows = ids.shape[1]
        cache.check_room(rows)
        assert mask.shape == (1, 1, rows, cache.length + rows), "the mask covers the committed past and these rows"
        assert positions.shape == (1, rows)
        assert safety is not None and m.GATE_LOGIT in safety, "an artifact with a probe always gets its feeds"
        self.calls.append(rows)
        cache.keys[0, 0, cache.length : cache.length + rows, 0] = ids[0]
        heads = np.array([rows - 1]) if head_rows is None else np.asarray(head_rows)
        logits = BIGRAM[ids[0, heads]][None].astype(np.float32)
        logp = _log_softmax(logits[0])
        top_ids = np.argsort(-logp, axis=-1, kind="stable")[:, :top_k]
        top_lp = np.take_along_axis(logp, top_ids, -1)
        return StepOut(logits, top_lp[None].astype(np.float32), top_ids[None].astype(np.int64),
                       HARM[ids[0]][None].astype(np.float32))


def _manifest(refusal_ids=(ID["I"],), defaults: SafetyConfig = SafetyConfig(k=3, lam=4.0, tau=0.6, depth=2),
              refusal_prefix=()):
    d = defaults
    safety = m.SafetyInfo(probe_layer=0, msav_layer=None, vectors_file=m.SAFETY_VECTORS_FILE,
                          defaults=m.SafetyDefaults(k=d.k, lam=d.lam, tau=d.tau, alpha=d.alpha, beta=d.beta,
                                                    lookahead_steps=d.lookahead_steps, depth=d.depth, gamma=d.gamma),
                          auroc_validation=1.0, auroc_held_out=None, report_file=m.CALIBRATION_REPORT,
                          refusal_ids=tuple(refusal_ids), refusal_prefix=tuple(refusal_prefix))
    return m.Manifest(
        schema_version=1, family="scripted", architecture="Scripted", dtype="float32",
        sizes=m.ModelSizes(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1, hidden_size=HIDDEN, vocab_size=V,
                           max_positions=64),
        graphs=(),
        tokenizer=m.TokenizerInfo(tokenizer_file=m.TOKENIZER_FILE, chat_template_file=None, bos_token=None,
                                  eos_token="<eos>", pad_token=None, bos_token_id=None, eos_token_ids=(EOS,),
                                  pad_token_id=None, add_bos_token=False),
        export=m.ExportInfo(tool_version="test", block_size=0, source="scripted", opset=23, safety_calibrated=True),
        safety=safety,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("scripted")
    tok = Tokenizer(models.WordLevel(ID, unk_token="ok"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(out / m.TOKENIZER_FILE))
    zeros = np.zeros(HIDDEN, np.float32)
    np.savez(out / m.SAFETY_VECTORS_FILE, **{m.PROBE_WEIGHT: zeros, m.PROBE_BIAS: np.zeros(1, np.float32),
                                             m.SAFETY_DIRECTION: zeros})
    return out


def generator(root, engine=None, **manifest_kwargs) -> Generator:
    return Generator.around(root, _manifest(**manifest_kwargs), engine or ScriptedEngine())


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reference(prompt: list[int], cfg: SafetyConfig | None, refusal_ids: tuple[int, ...], max_new: int,
              min_new: int = 0, prefix: tuple[int, ...] = ()) -> tuple[list[int], list[dict]]:
    """The loop's rules, written out plainly for the bigram model: -> (generated ids, lookahead records)."""
    out, records = [], []
    last = prompt[-1]  # the row whose logits choose the next token; its probe score is the gate's
    # the prompt gate: a prompt scoring >= refuse_above (< 1) opens the reply with the prefix
    forced = list(prefix) if cfg is not None and cfg.refuse_above < 1 and sig(HARM[last]) >= cfg.refuse_above else []
    for step in range(max_new):
        lp = _log_softmax(BIGRAM[last])
        banned = {EOS} if len(out) < min_new else set()
        gate = sig(HARM[last])
        if forced:
            token = forced.pop(0)
        elif cfg is not None and step < cfg.lookahead_steps and gate >= cfg.tau:
            order = [int(i) for i in np.argsort(-lp, kind="stable")[: cfg.k]]
            extra = [i for i in (refusal_ids if step == 0 else ()) if i not in order and i not in banned]
            cands = [c for c in order + extra if c not in banned]
            branch = []
            for c in cands:
                scores, tok = [sig(HARM[c])], c
                for _ in range(cfg.depth):
                    if tok == EOS:
                        break
                    tok = int(np.argmax(BIGRAM[tok]))
                    scores.append(sig(HARM[tok]))
                branch.append(float(np.mean(scores)))
            lam = steering_strength(cfg, gate)
            token = cands[int(np.argmax([lp[c] - lam * b for c, b in zip(cands, branch)]))]
            records.append({"step": step, "candidates": cands, "branch_scores": branch, "token": token})
        else:
            masked = lp.copy()
            masked[list(banned)] = -np.inf
            token = int(np.argmax(masked))
        out.append(token)
        if token == EOS:
            break
        last = token
    return out, records


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def test_undefended_greedy_follows_the_chain_and_commits_what_it_fed(root):
    gen = generator(root)
    res = gen.generate(prompt_ids=ids("hi"), safety=False, max_new_tokens=10)
    want, _ = reference(ids("hi"), None, (), 10)
    assert res.token_ids == want == ids("sure here is how bomb sure here is how bomb")
    assert res.finish_reason == "length" and res.text == "sure here is how bomb sure here is how bomb"
    # the cache holds the prompt and every generated token but the last (its pass would only give a score)
    assert gen._cache.keys[0, 0, : gen._cache.length, 0].tolist() == ids("hi") + want[:-1]
    assert gen.engine.calls == [1] * 10  # prefill of one row, then one row per fed token
    assert res.prompt_score == pytest.approx(sig(HARM[ID["hi"]]))


def test_end_token_stops_and_is_not_in_the_text(root):
    res = generator(root).generate(prompt_ids=ids("I"), safety=False, max_new_tokens=10)
    assert res.token_ids == ids("sorry no . <eos>") and res.finish_reason == "eos" and res.text == "sorry no ."


def test_min_new_tokens_holds_the_end_token_off(root):
    res = generator(root).generate(prompt_ids=ids("I"), safety=False, max_new_tokens=6, min_new_tokens=5)
    want, _ = reference(ids("I"), None, (), 6, min_new=5)
    assert res.token_ids == want and EOS not in want[:5] and len(want) == 6


def test_stop_strings_cut_the_text_and_stream_pieces_add_up(root):
    gen = generator(root)
    res = gen.generate(prompt_ids=ids("hi"), safety=False, max_new_tokens=10, stop=["is how"])
    assert res.finish_reason == "stop" and res.text == "sure here "
    run = gen.stream(prompt_ids=ids("hi"), safety=False, max_new_tokens=10, stop=["is how"])
    pieces = []
    while True:
        try:
            pieces.append(next(run))
        except StopIteration as done:
            streamed = done.value
            break
    assert "".join(pieces) == streamed.text == res.text and len(pieces) > 1


@pytest.mark.parametrize("knobs", [dict(k=3, lam=4.0, tau=0.6, depth=0), dict(k=3, lam=4.0, tau=0.6, depth=2),
                                   dict(k=4, lam=1.0, tau=0.6, depth=3, gamma=1.0),
                                   dict(k=2, lam=0.5, tau=0.6, depth=1, lookahead_steps=2)])
def test_safesteer_matches_the_plain_rule(root, knobs):
    cfg = SafetyConfig(**knobs)
    gen = generator(root)
    res = gen.generate(prompt_ids=ids("hi bomb"), safety=cfg, max_new_tokens=8)
    want, records = reference(ids("hi bomb"), cfg, (ID["I"],), 8)
    assert res.token_ids == want
    looked = [r for r in res.safety_trace if r["lookahead"]]
    assert [r["step"] for r in looked] == [r["step"] for r in records]
    for got, exp in zip(looked, records):
        assert got["candidates"] == exp["candidates"] and got["token"] == exp["token"]
        np.testing.assert_allclose(got["branch_scores"], exp["branch_scores"], rtol=1e-6)
    # whatever the branches did, the cache holds exactly the prompt and the chosen tokens
    assert gen._cache.keys[0, 0, : gen._cache.length, 0].tolist() == ids("hi bomb") + want[:-1]


def test_strong_steering_takes_the_refusal_opener_at_the_first_step_only(root):
    cfg = SafetyConfig(k=2, lam=50.0, tau=0.6, depth=3)
    res = generator(root).generate(prompt_ids=ids("bomb"), safety=cfg, max_new_tokens=6)
    assert res.text == "I sorry no ." and res.finish_reason == "eos"
    first = res.safety_trace[0]
    assert ID["I"] in first["candidates"] and ID["I"] not in ids("sure how")  # not a top-2 candidate: an opener
    assert first["changed"] and first["score_gate"] == pytest.approx(sig(HARM[ID["bomb"]]))
    # a later fired step never offers it: "how" (harmful) after a compliant start is steered among top-k only
    res = generator(root).generate(prompt_ids=ids("cake sure here is"), safety=cfg, max_new_tokens=4)
    later = [r for r in res.safety_trace if r["lookahead"] and r["step"] > 0]
    assert later and all(ID["I"] not in r["candidates"] for r in later)


@pytest.mark.parametrize("prompt,prefix,forced", [("hi bomb", "I sorry", True), ("bomb", "sure", True),
                                                   ("hi", "I sorry", False)])
def test_the_prompt_gate_opens_with_the_refusal_prefix_then_steers_as_usual(root, prompt, prefix, forced):
    """refuse_above: "bomb" scores 0.95 >= 0.9, "hi" 0.05; after the prefix the gate is watched as usual (after
    "sure", a compliance word at 0.5 >= tau 0.4, lookahead steers)."""
    cfg = SafetyConfig(k=3, lam=4.0, tau=0.4, depth=2, refuse_above=0.9)
    gen = generator(root, refusal_prefix=ids(prefix))
    res = gen.generate(prompt_ids=ids(prompt), safety=cfg, max_new_tokens=8)
    want, records = reference(ids(prompt), cfg, (ID["I"],), 8, prefix=tuple(ids(prefix)))
    assert res.token_ids == want
    assert (want[: len(ids(prefix))] == ids(prefix)) == forced
    flags = [r.get("forced", False) for r in res.safety_trace]
    assert flags == [forced] * len(ids(prefix)) + [False] * (len(flags) - len(ids(prefix)))
    looked = [r for r in res.safety_trace if r["lookahead"]]
    assert [(r["step"], r["token"]) for r in looked] == [(r["step"], r["token"]) for r in records]
    if prefix == "sure":
        assert looked and looked[0]["step"] == 1  # the gate watched the forced token's row
    kept = len(want) - (0 if looked and looked[-1]["step"] == len(want) - 1 else 1)  # a lookahead commits its row
    assert gen._cache.keys[0, 0, : gen._cache.length, 0].tolist() == ids(prompt) + want[:kept]


def test_a_prompt_below_the_gate_decodes_exactly_as_undefended(root):
    gen = generator(root)
    off = gen.generate(prompt_ids=ids("cake"), safety=False, max_new_tokens=3)
    on = gen.generate(prompt_ids=ids("cake"), safety=SafetyConfig(k=3, lam=4.0, tau=0.6, depth=2), max_new_tokens=3)
    assert on.token_ids == off.token_ids and not any(r["lookahead"] for r in on.safety_trace)


def test_gamma_scales_the_steering_with_the_gate_score():
    cfg = SafetyConfig(lam=2.0, tau=0.5, gamma=1.0)
    assert steering_strength(cfg, 0.5) == pytest.approx(2.0)
    assert steering_strength(cfg, 0.9) == pytest.approx(2.0 * 9.0)
    assert steering_strength(SafetyConfig(lam=2.0, tau=0.5), 0.9) == 2.0  # gamma 0: constant
    assert math.isfinite(steering_strength(SafetyConfig(lam=2.0, tau=0.5, gamma=8.0), 1.0))


def test_sampling_is_reproducible_from_its_seed(root):
    gen = generator(root)
    runs = [gen.generate(prompt_ids=ids("hi"), safety=False, do_sample=True, temperature=2.0, seed=s,
                         max_new_tokens=8).token_ids for s in (1, 1, 2, 3, 4)]
    assert runs[0] == runs[1] and len({tuple(r) for r in runs[1:]}) > 1


def test_a_sampling_config_equals_the_flat_keywords_and_not_both(root):
    from safesteer_runtime.sampling import SamplingConfig

    gen = generator(root)
    flat = gen.generate(prompt_ids=ids("hi"), safety=False, do_sample=True, temperature=2.0, seed=5, max_new_tokens=8)
    cfg = SamplingConfig(do_sample=True, temperature=2.0, seed=5)
    assert gen.generate(prompt_ids=ids("hi"), safety=False, sampling=cfg, max_new_tokens=8).token_ids == flat.token_ids
    with pytest.raises(ConfigError, match="not both"):
        gen.generate(prompt_ids=ids("hi"), sampling=cfg, temperature=0.5)
    with pytest.raises(ConfigError, match="must be a SamplingConfig"):
        gen.generate(prompt_ids=ids("hi"), sampling={"do_sample": True})


def test_bad_requests_get_clear_errors(root):
    gen = generator(root, ScriptedEngine(context_limit=8))
    with pytest.raises(PromptTooLongError, match="shorten the prompt or lower max_new_tokens"):
        gen.generate(prompt_ids=ids("hi"), max_new_tokens=8)
    with pytest.raises(InputError, match="outside the vocabulary"):
        gen.generate(prompt_ids=[V + 3])
    with pytest.raises(InputError, match="exactly one of"):
        gen.generate(prompt="hi", prompt_ids=ids("hi"))
    with pytest.raises(InputError, match="no chat template"):
        gen.generate([{"role": "user", "content": "hi"}])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        gen.generate(prompt_ids=ids("hi"), max_new_tokens=0)
    with pytest.raises(ConfigError, match="stop must be a list"):
        gen.generate(prompt_ids=ids("hi"), stop="\n")
    with pytest.raises(ConfigError, match="tau"):
        gen.generate(prompt_ids=ids("hi"), safety=SafetyConfig(tau=1.5))
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['max_tokens'\]"):
        gen.generate(prompt_ids=ids("hi"), max_tokens=5)
    with pytest.raises(ConfigError, match="unknown argument"):
        next(gen.stream(prompt_ids=ids("hi"), temprature=0.5))
    # the generator is still usable after every refusal
    assert gen.generate(prompt_ids=ids("I"), safety=False, max_new_tokens=4).text == "sorry no ."


def test_a_second_request_while_a_stream_is_open_is_refused_not_mixed(root):
    gen = generator(root)
    alone = gen.generate(prompt_ids=ids("hi"), safety=False, max_new_tokens=6).text
    a = gen.stream(prompt_ids=ids("hi"), safety=False, max_new_tokens=6)
    first = next(a)
    with pytest.raises(BusyError, match="close"):
        next(gen.stream(prompt_ids=ids("I"), safety=False, max_new_tokens=6))
    with pytest.raises(BusyError):
        gen.generate(prompt_ids=ids("I"), safety=False, max_new_tokens=6)
    with pytest.raises(BusyError):
        gen.token_logprobs(ids("hi sure"))
    rest = "".join(a)  # the open stream is untouched by the refusals
    assert first + rest == alone
    b = gen.stream(prompt_ids=ids("hi"), safety=False, max_new_tokens=6)
    next(b)
    b.close()  # an abandoned stream frees the Generator once closed
    assert gen.generate(prompt_ids=ids("I"), safety=False, max_new_tokens=6).text == "sorry no ."


def test_threads_get_their_own_answer_or_busy_never_a_mixed_one(root):
    import threading
    import time

    class Slow(ScriptedEngine):
        def step(self, *args, **kwargs):
            time.sleep(0.002)  # widen the window for overlap
            return super().step(*args, **kwargs)

    gen = generator(root, Slow())
    want = {w: gen.generate(prompt_ids=ids(w), safety=False, max_new_tokens=8).text for w in ("hi", "I", "cake")}
    outcomes: list[tuple[str, str]] = []

    def worker(word: str) -> None:
        for _ in range(5):
            try:
                outcomes.append((word, gen.generate(prompt_ids=ids(word), safety=False, max_new_tokens=8).text))
            except BusyError:
                outcomes.append((word, "busy"))

    threads = [threading.Thread(target=worker, args=(w,)) for w in ("hi", "I", "cake", "hi")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(outcomes) == 20
    assert all(text in (want[word], "busy") for word, text in outcomes)
    assert any(text == "busy" for _, text in outcomes) and any(text != "busy" for _, text in outcomes)
