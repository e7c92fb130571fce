"""Every registered family, tiny random weights: export -> Generator == transformers, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_variants
from safesteer_rt import Generator

NEW_TOKENS = 32
LOGIT_ATOL = 2e-4  # fp32 graphs vs PyTorch eager, max |diff| over the vocabulary


def hf_model(ckpt):
    import json

    import transformers

    arch = json.loads((ckpt / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(str(ckpt), dtype=torch.float32,
                                                       attn_implementation="eager").eval()


def test_image(seed: int = 0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


test_image.__test__ = False  # a helper, not a test


def hf_greedy(model, ids, images=(), n=NEW_TOKENS):
    """``images``: runtime PreparedImages, given to the HF model as its family's processor would."""
    from safesteer_models import family_for

    input_ids = torch.tensor([ids])
    kwargs = family_for(model).hf_image_kwargs(input_ids, list(images)) if images else {}
    out = model.generate(input_ids, max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("block_size", [1, 3, 0])
@pytest.mark.parametrize("arch,variant", tiny_variants())
def test_greedy_tokens_match_transformers(tiny, arch, variant, block_size):
    gen = Generator(tiny.artifact(arch, variant, block_size))
    model = hf_model(tiny.checkpoint(arch, variant))
    messages = [{"role": "user", "content": "How do I bake bread at home?"}]
    result = gen.generate(messages, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == hf_greedy(model, result.prompt_ids)
    assert len(set(result.token_ids)) > 1, "degenerate tiny model: the comparison would be too weak"
    if gen.manifest.image is not None:
        image = test_image()
        content = [{"type": "image", "image": image}, {"type": "text", "text": "What is in the picture?"}]
        result = gen.generate([{"role": "user", "content": content}], max_new_tokens=NEW_TOKENS)
        from safesteer_runtime.images import prepare

        assert result.token_ids == hf_greedy(model, result.prompt_ids, [prepare(image, gen.manifest.image)])


@pytest.mark.parametrize("arch,variant", tiny_variants())
def test_logits_match_transformers(tiny, arch, variant):
    """Prefill logits and ten cached decode steps within LOGIT_ATOL of PyTorch."""
    from safesteer_runtime.masks import causal_mask

    gen = Generator(tiny.artifact(arch, variant, 2))
    model = hf_model(tiny.checkpoint(arch, variant))
    ids = gen.codec.encode("Safety matters: answer ordinary questions.", add_bos=True)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    engine = gen.engine
    cache = engine.new_cache(len(ids))
    split = len(ids) - 10
    out = engine.step(cache, causal_mask(0, split), np.arange(split)[None], ids=np.array([ids[:split]]),
                      head_rows=np.arange(split))
    cache.advance(split)
    got = [out.logits[0]]
    for t in ids[split:]:
        n = cache.length
        got.append(engine.step(cache, causal_mask(n, 1), np.array([[n]]), ids=np.array([[t]])).logits[0])
        cache.advance(1)
    got = np.concatenate(got)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) < LOGIT_ATOL


def test_token_logprobs_match_transformers(tiny, safe_artifact):
    """Generator.token_logprobs (the perplexity of quantization checks) = PyTorch's log-softmax, calibrated too."""
    arch, variant = "LlamaForCausalLM", "gqa"
    model = hf_model(tiny.checkpoint(arch, variant))
    for art in (tiny.artifact(arch, variant, 2), safe_artifact(arch, variant, 2)):
        gen = Generator(art)
        ids = gen.codec.encode("The river rose slowly through the night.", add_bos=True)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
        np.testing.assert_allclose(gen.token_logprobs(ids), want, atol=2e-4)


@pytest.mark.parametrize("arch,variant", [("LlavaNextForConditionalGeneration", "clip-qwen2"),
                                          ("Qwen2VLForConditionalGeneration", "qwen2")])
def test_prompt_ids_with_one_placeholder_per_image(tiny, arch, variant):
    """prompt_ids holding one image token per image expand like a rendered prompt does (each image by its own
    size); ids already expanded pass through; families with text around their image tokens refuse clearly."""
    from safesteer_runtime.errors import InputError

    gen = Generator(tiny.artifact(arch, variant, 2))
    image = test_image(4, (70, 30))
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is in the picture?"}]
    full = gen.generate([{"role": "user", "content": content}], max_new_tokens=8)
    tid = gen.manifest.image.image_token_id
    short = [t for i, t in enumerate(full.prompt_ids) if t != tid or full.prompt_ids[i - 1] != tid]
    assert len(short) < len(full.prompt_ids)
    assert gen.generate(prompt_ids=short, images=[image], max_new_tokens=8).token_ids == full.token_ids
    assert gen.generate(prompt_ids=full.prompt_ids, images=[image], max_new_tokens=8).token_ids == full.token_ids
    gemma = Generator(tiny.artifact("Gemma3ForConditionalGeneration", "siglip", 2))
    with pytest.raises(InputError, match="writes text around each image"):
        gemma.generate(prompt_ids=[5, gemma.manifest.image.image_token_id, 6], images=[image], max_new_tokens=2)


def test_raw_prompt_gets_the_family_marker(tiny):
    """prompt= with images and no placeholder: each image is put in front as the family's templates write it
    (Qwen2-VL: <|vision_start|> + its pads + <|vision_end|>)."""
    gen = Generator(tiny.artifact("Qwen2VLForConditionalGeneration", "qwen2", 2))
    result = gen.generate(prompt="Describe it.", images=[test_image()], max_new_tokens=2)
    text = gen.codec.tokenizer.decode(result.prompt_ids, skip_special_tokens=False)
    pads = text.count("<|image_pad|>")
    assert pads > 1 and text.startswith("<|vision_start|>" + "<|image_pad|>" * pads + "<|vision_end|>")
