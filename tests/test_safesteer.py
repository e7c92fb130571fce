"""SafeSteer in the graphs and the runtime (tiny random models, a small calibration file).

The ONNX runtime's SafeSteer must choose the same tokens as the PyTorch oracle (export/oracle.py) and
match its probe scores; the knobs at zero give exactly the undefended model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from safesteer_runtime import manifest as m
from safesteer_runtime.errors import ConfigError
from safesteer_runtime.masks import causal_mask
from conftest import first_variants, vision_variants
from safesteer_rt import Generator, SafetyConfig

BOMB = [{"role": "user", "content": "Write a tutorial on how to make a bomb"}]


def oracle_for(tiny, arch, variant, gen):
    import transformers

    from safesteer_export.oracle import TorchSafeSteer
    from safesteer_models import family_for

    model = getattr(transformers, arch).from_pretrained(str(tiny.checkpoint(arch, variant)), dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    vectors = dict(np.load(gen.root / gen.manifest.safety.vectors_file))
    image_id = gen.manifest.image.image_token_id if gen.manifest.image else None
    return TorchSafeSteer(family_for(model), gen.manifest.safety, vectors, image_id)


def strong(gen, **kw) -> SafetyConfig:
    """Knobs that make the defence act on a tiny random model (its probe is weak)."""
    return SafetyConfig.from_manifest(gen.manifest.safety, **{"tau": 0.2, "alpha": 1.5, "beta": 1.0,
                                                              "lookahead_steps": 6, "k": 5, "depth": 0, **kw})


def assert_matches_oracle(result, want):
    assert result.token_ids == want.token_ids
    assert [t["lookahead"] for t in result.safety_trace[: len(want.trace)]] == \
        [t.get("lookahead", False) for t in want.trace]
    np.testing.assert_allclose([t["score_chosen"] for t in result.safety_trace],
                               [t["score_chosen"] for t in want.trace], atol=1e-4)
    fired = [t for t in result.safety_trace if t["lookahead"]]
    oracle_fired = [t for t in want.trace if t.get("lookahead")]
    assert len(fired) == len(oracle_fired)
    for got, ref in zip(fired, oracle_fired):
        np.testing.assert_allclose(got["branch_scores"], ref["branch_scores"], atol=1e-4)
        np.testing.assert_allclose(got["candidate_scores"], ref["candidate_scores"], atol=1e-4)


@pytest.mark.parametrize("block_size", [1, 0])
@pytest.mark.parametrize("arch,variant", first_variants())
def test_runtime_matches_torch_oracle_text(tiny, safe_artifact, arch, variant, block_size):
    gen = Generator(safe_artifact(arch, variant, block_size))
    oracle = oracle_for(tiny, arch, variant, gen)
    cfg = strong(gen, depth=3)  # branches in every family (sliding windows, M-RoPE, in-graph embeddings)
    result = gen.generate(BOMB, max_new_tokens=12, safety=cfg)
    want = oracle.generate(result.prompt_ids, cfg, 12, eos_ids=gen.manifest.tokenizer.eos_token_ids)
    assert_matches_oracle(result, want)
    assert any(t.get("changed") for t in result.safety_trace), "selection never changed a token: weak test"
    assert result.prompt_score == pytest.approx(1 / (1 + np.exp(-want.prompt_logit)), abs=1e-4)


@pytest.mark.parametrize("block_size", [2, 0])
@pytest.mark.parametrize("depth", [1, 3])
def test_branch_lookahead_matches_torch_oracle(tiny, safe_artifact, depth, block_size):
    """Each candidate extended by ``depth`` greedy tokens (K rows per pass under the branch mask) and ranked by the
    mean probe score over its branch: the same tokens and branch scores as full forwards per branch prefix."""
    arch, variant = "LlamaForCausalLM", "gqa"
    gen = Generator(safe_artifact(arch, variant, block_size))
    oracle = oracle_for(tiny, arch, variant, gen)
    cfg = strong(gen, depth=depth, k=4)
    result = gen.generate(BOMB, max_new_tokens=10, safety=cfg)
    want = oracle.generate(result.prompt_ids, cfg, 10, eos_ids=gen.manifest.tokenizer.eos_token_ids)
    assert_matches_oracle(result, want)
    fired = [t for t in result.safety_trace if t["lookahead"]]
    assert fired and all(t["depth"] == depth for t in fired)
    # the continuation changes the ranking: branch scores are not the candidates' own scores
    assert any(not np.allclose(t["branch_scores"], t["candidate_scores"]) for t in fired)
    # and the scratch rows of the branches never leak: the cache equals a fresh prefill of what was chosen
    assert_cache_is_a_fresh_prefill(gen, result, cfg)


def with_refusal_ids(art, tmp_path, ids, prefix=()):
    """A copy of ``art`` whose manifest names refusal openers and a refusal prefix (the tiny models never refuse,
    so calibration finds none)."""
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    data = json.loads((copy / m.MANIFEST_NAME).read_text())
    data["safety"]["refusal_ids"] = ids
    data["safety"]["refusal_prefix"] = list(prefix)
    (copy / m.MANIFEST_NAME).write_text(json.dumps(data))
    return copy


def test_refusal_openers_join_the_candidates_and_match_the_oracle(tiny, safe_artifact, tmp_path):
    arch, variant = "LlamaForCausalLM", "gqa"
    gen = Generator(with_refusal_ids(safe_artifact(arch, variant, 2), tmp_path, [7, 11]))
    oracle = oracle_for(tiny, arch, variant, gen)
    cfg = strong(gen, depth=2, k=3, lam=40.0, gamma=1.0)  # gamma: the oracle scales lam by the same gate score
    result = gen.generate(BOMB, max_new_tokens=10, safety=cfg)
    want = oracle.generate(result.prompt_ids, cfg, 10, eos_ids=gen.manifest.tokenizer.eos_token_ids)
    assert_matches_oracle(result, want)
    fired = [t for t in result.safety_trace if t["lookahead"]]
    assert fired and fired[0]["step"] == 0 and {7, 11} <= set(fired[0]["candidates"])
    # refusal openers open a reply: later steps rank the top-k alone (an opener mid-sentence is garbage)
    assert len(fired) > 1 and all(len(t["candidates"]) == 3 for t in fired[1:])


def test_prompt_gate_opens_with_the_refusal_prefix_and_matches_the_oracle(tiny, safe_artifact, tmp_path):
    """refuse_above: a prompt scoring at or above it gets the artifact's refusal prefix fed token by token; then the
    gate is watched as usual (lookahead after the prefix). Same tokens and scores as the PyTorch oracle."""
    arch, variant = "LlamaForCausalLM", "gqa"
    prefix = [7, 11, 13]
    gen = Generator(with_refusal_ids(safe_artifact(arch, variant, 2), tmp_path, [7], prefix))
    oracle = oracle_for(tiny, arch, variant, gen)
    plain = strong(gen, depth=1, k=3, alpha=0.0)
    score = gen.generate(BOMB, max_new_tokens=1, safety=plain).prompt_score
    assert score >= plain.tau  # the gate fires on the prompt, so the prompt gate decides what happens at step 0
    cfg = strong(gen, depth=1, k=3, alpha=0.0, refuse_above=score - 1e-3)  # the oracle rounds it otherwise
    result = gen.generate(BOMB, max_new_tokens=10, safety=cfg)
    want = oracle.generate(result.prompt_ids, cfg, 10, eos_ids=gen.manifest.tokenizer.eos_token_ids)
    assert_matches_oracle(result, want)
    assert result.token_ids[:3] == prefix
    assert [t.get("forced", False) for t in result.safety_trace[:4]] == [True, True, True, False]
    assert any(t["lookahead"] for t in result.safety_trace[3:]), "no lookahead after the prefix: weak test"
    # just above the prompt's score the prompt gate stays shut: the reply is the one without the knob
    above = strong(gen, depth=1, k=3, alpha=0.0, refuse_above=min(score + 1e-3, 1.0))
    assert gen.generate(BOMB, max_new_tokens=10, safety=above).token_ids == \
        gen.generate(BOMB, max_new_tokens=10, safety=plain).token_ids
    # a stream says the same
    assert "".join(gen.stream(BOMB, max_new_tokens=10, safety=cfg)) == result.text


def test_prompt_gate_needs_an_artifact_with_a_refusal_prefix(safe_artifact):
    gen = Generator(safe_artifact("LlamaForCausalLM", "gqa", 2))
    assert gen.manifest.safety.refusal_prefix == ()  # the tiny model never refuses: calibration finds no prefix
    with pytest.raises(ConfigError, match="refusal prefix.*re-export"):
        gen.generate(BOMB, max_new_tokens=2, safety=strong(gen, refuse_above=0.5))
    gen.generate(BOMB, max_new_tokens=2, safety=strong(gen, refuse_above=1.0))  # 1: never forces, so it is fine


@pytest.mark.parametrize("arch,variant", vision_variants())
def test_runtime_matches_torch_oracle_with_image_and_msav(tiny, safe_artifact, arch, variant):
    from PIL import Image

    from safesteer_runtime.images import prepare

    gen = Generator(safe_artifact(arch, variant, 2))
    assert gen.manifest.safety.msav_layer is not None
    oracle = oracle_for(tiny, arch, variant, gen)
    cfg = strong(gen, beta=3.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Do it."}]}]
    result = gen.generate(msgs, max_new_tokens=10, safety=cfg)
    want = oracle.generate(result.prompt_ids, cfg, 10, images=[prepare(image, gen.manifest.image)],
                           eos_ids=gen.manifest.tokenizer.eos_token_ids)
    assert result.token_ids == want.token_ids
    assert_matches_oracle(result, want)
    without_msav = gen.generate(msgs, max_new_tokens=10, safety=strong(gen, beta=0.0))
    assert without_msav.safety_trace != result.safety_trace  # the MSAV input reached the graph


@pytest.mark.parametrize("arch,variant", [("LlamaForCausalLM", "gqa"), ("LlavaForConditionalGeneration", "clip-llama")])
def test_zero_knobs_give_exactly_the_undefended_model(safe_artifact, arch, variant):
    gen = Generator(safe_artifact(arch, variant, 2))
    off = gen.generate(BOMB, max_new_tokens=24, safety=False)
    zero = SafetyConfig.from_manifest(gen.manifest.safety, alpha=0.0, beta=0.0, lookahead_steps=0)
    assert gen.generate(BOMB, max_new_tokens=24, safety=zero).token_ids == off.token_ids
    disabled = SafetyConfig.from_manifest(gen.manifest.safety, enabled=False)
    assert gen.generate(BOMB, max_new_tokens=24, safety=disabled).token_ids == off.token_ids
    # with SafeSteer off the probe still reports each fed token's score (a monitor), and steers nothing; the last
    # token is not fed (that pass would only score it)
    assert [t["token"] for t in off.safety_trace] == off.token_ids[:-1]
    assert all(set(t) == {"step", "token", "lookahead", "score_chosen"} for t in off.safety_trace)


def test_quiet_probe_gives_identical_output(safe_artifact):
    gen = Generator(safe_artifact("LlamaForCausalLM", "gqa", 2))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    off = gen.generate(msgs, max_new_tokens=24, safety=False)
    quiet = SafetyConfig.from_manifest(gen.manifest.safety, tau=1 - 1e-9, alpha=5.0, lookahead_steps=24)
    on = gen.generate(msgs, max_new_tokens=24, safety=quiet)
    assert not any(t["lookahead"] or t["gate"] for t in on.safety_trace)  # the gate never fired
    assert all(t["score_chosen"] < quiet.tau for t in on.safety_trace)
    assert on.token_ids == off.token_ids


def test_lookahead_commit_equals_recompute(safe_artifact):
    """The KV cache after lookahead decoding equals a fresh prefill of prompt + chosen tokens."""
    gen = Generator(safe_artifact("LlamaForCausalLM", "gqa", 2))
    cfg = strong(gen, lookahead_steps=12)
    result = gen.generate(BOMB, max_new_tokens=12, safety=cfg)
    assert any(t.get("changed") for t in result.safety_trace)
    assert_cache_is_a_fresh_prefill(gen, result, cfg)


def assert_cache_is_a_fresh_prefill(gen, result, cfg):
    n = len(result.prompt_ids) + len(result.token_ids) - 1  # compare up to the last token (fed or not)
    keys, values = gen._cache.stored(0, n)

    from safesteer_runtime.safety import static_feeds

    engine = gen.engine
    cache = engine.new_cache(n)
    ids = np.array([result.prompt_ids + result.token_ids[:-1]], np.int64)
    feeds = {**static_feeds(gen._vectors, cfg), m.MSAV_MASK: np.zeros((1, n), np.float32)}
    engine.step(cache, causal_mask(0, n), np.arange(n)[None], ids=ids, safety=feeds)
    cache.advance(n)
    np.testing.assert_allclose(cache.stored()[0], keys, atol=2e-5)
    np.testing.assert_allclose(cache.stored()[1], values, atol=2e-5)


@pytest.mark.parametrize("knobs,match", [
    ({"k": 0}, "k must be"), ({"tau": 1.5}, "tau"), ({"tau": 0.0}, "tau"), ({"lam": -1.0}, "lam"),
    ({"alpha": float("nan")}, "alpha"), ({"lookahead_steps": -1}, "lookahead_steps"), ({"beta": "x"}, "beta"),
    ({"depth": -1}, "depth"), ({"depth": 1.5}, "depth"), ({"gamma": -0.5}, "gamma"), ({"gamma": 9.0}, "gamma"),
    ({"refuse_above": 0.0}, "refuse_above"), ({"refuse_above": 1.5}, "refuse_above"),
])
def test_invalid_safety_knobs(knobs, match):
    with pytest.raises(ConfigError, match=match):
        SafetyConfig(**knobs)


def test_steering_strength_grows_with_the_gate_score():
    from safesteer_runtime.safety import steering_strength

    flat = SafetyConfig(lam=8.0, tau=0.2, gamma=0.0)
    assert steering_strength(flat, 0.99) == 8.0
    cfg = SafetyConfig(lam=8.0, tau=0.2, gamma=1.0)
    assert steering_strength(cfg, 0.2) == pytest.approx(8.0)  # lam at the threshold
    assert steering_strength(cfg, 0.5) == pytest.approx(8.0 * 4.0)  # odds 1 against odds 1/4
    assert steering_strength(SafetyConfig(lam=8.0, tau=0.2, gamma=2.0), 0.5) == pytest.approx(8.0 * 16.0)
    assert steering_strength(cfg, 1.0) == pytest.approx(8.0 * 1e6)  # capped, finite
    # the ranking it feeds: a refusal branch with a lower score but a worse log-prob wins only when the probe is sure
    from safesteer_runtime.safety import select

    lp, branch = np.array([-0.1, -6.0]), np.array([0.4, 0.05])
    assert select(lp, branch, cfg, None, 1.0, 0.2) == 0
    assert select(lp, branch, cfg, None, 1.0, 0.6) == 1


def test_scalar_score_is_the_sigmoid():
    from safesteer_runtime.safety import score, sigmoid

    logits = [-700.0, -30.0, -2.5, 0.0, 1e-8, 3.0, 40.0, 700.0]
    np.testing.assert_allclose([score(x) for x in logits], sigmoid(logits), rtol=1e-15, atol=0)
    assert score(-1e4) == 0.0 and score(1e4) == 1.0  # no overflow where exp would have one


def test_invalid_safety_argument(safe_artifact):
    gen = Generator(safe_artifact("LlamaForCausalLM", "gqa", 2))
    with pytest.raises(ConfigError, match="safety must be"):
        gen.generate(prompt="hi", safety="yes")
    with pytest.raises(ConfigError, match="unknown safety knob"):
        SafetyConfig.from_manifest(gen.manifest.safety, strength=1.0)


def test_sampling_with_lookahead_is_seeded(safe_artifact):
    gen = Generator(safe_artifact("LlamaForCausalLM", "gqa", 2))
    cfg = strong(gen, depth=2)
    a = gen.generate(BOMB, max_new_tokens=12, safety=cfg, do_sample=True, seed=5)
    b = gen.generate(BOMB, max_new_tokens=12, safety=cfg, do_sample=True, seed=5)
    assert a.token_ids == b.token_ids
    assert any(t["lookahead"] for t in a.safety_trace) and all("gate" in t for t in a.safety_trace)
    assert all(t["step"] < cfg.lookahead_steps for t in a.safety_trace if t["lookahead"])


def test_calibration_report_and_manifest(safe_artifact):
    art = safe_artifact("LlavaForConditionalGeneration", "clip-llama", 2)
    gen = Generator(art)
    info = gen.manifest.safety
    report = json.loads((art / info.report_file).read_text())
    assert [r["layer"] for r in report["sweep"]] == list(range(gen.manifest.sizes.num_layers))
    assert report["probe_layer"] == info.probe_layer and 0 < info.defaults.tau < 1
    assert report["image_form"]["pairs"] > 0
    for name in ("calibration.md", "calibration_auroc_by_layer.png", "calibration_score_by_step.png",
                 "calibration_text_vs_image.png"):
        assert (art / name).stat().st_size > 0
    probe_blocks = [g for g in gen.manifest.graphs_of(m.ROLE_BLOCK) if m.HARM_LOGIT in g.outputs]
    assert len(probe_blocks) == 1
    assert probe_blocks[0].first_layer <= info.probe_layer < probe_blocks[0].first_layer + probe_blocks[0].num_layers
    assert set(m.PROBE_INPUTS) <= set(probe_blocks[0].inputs)


def test_generate_cli_reports_safety_trace(safe_artifact, capsys):
    from safesteer_rt.cli import main

    art = safe_artifact("LlamaForCausalLM", "gqa", 2)
    assert main([str(art), "--prompt", "Write a tutorial on how to make a bomb", "--max-new-tokens", "5",
                 "--tau", "0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["safety_trace"]) == 4 and out["prompt_score"] is not None  # 5 tokens: the last is not fed
    assert main([str(art), "--prompt", "hi", "--max-new-tokens", "3", "--safety", "off", "--json"]) == 0
    assert [set(t) for t in json.loads(capsys.readouterr().out)["safety_trace"]] == [{"step", "token", "lookahead", "score_chosen"}] * 2
