"""numpy/Pillow preprocessing == the model's HF image processor; chat templates == transformers; sandboxing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from safesteer_runtime.errors import InputError
from safesteer_runtime.images import preprocess
from safesteer_runtime.manifest import TokenizerInfo
from safesteer_runtime.text import ChatTemplate
from safesteer_rt import Generator

SIZES = [(224, 224), (300, 200), (199, 401), (17, 23), (640, 480)]  # (width, height)


def processors():
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    return {
        "clip-336": CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        "siglip-384": SiglipImageProcessorPil(size={"height": 384, "width": 384}),
        "dinov2-224": CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                           image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    }


@pytest.mark.parametrize("name", ["clip-336", "siglip-384", "dinov2-224"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_pixels_match_hf_processor(tmp_path, name, size, mode):
    import torch
    from transformers import LlavaConfig

    from safesteer_models.llava import LlavaFamily

    proc = processors()[name]
    proc.save_pretrained(str(tmp_path))
    rng = np.random.default_rng(hash((name, size, mode)) % 2**32)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)

    class _Tok:
        @staticmethod
        def convert_ids_to_tokens(i):
            return "<image>"

    family = LlavaFamily.__new__(LlavaFamily)  # image_info only needs the processor and a vision module
    family.model = type("M", (), {"config": LlavaConfig(image_token_id=5)})()
    family.vision_module = lambda: (lambda px: torch.zeros(px.shape[0], 7, 4))
    info = family.image_info(tmp_path, _Tok())
    want = proc(images=image, return_tensors="np")["pixel_values"][0]
    got = preprocess(image, info)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chat_template_matches_transformers(tiny):
    from transformers import AutoTokenizer

    ckpt = tiny.checkpoint("LlamaForCausalLM", "gqa")
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    gen = Generator(tiny.artifact("LlamaForCausalLM", "gqa"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bake bread?"},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "How?"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert gen.chat.render(messages) == want
    want_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want_ids = want_ids["input_ids"] if hasattr(want_ids, "keys") else want_ids
    assert gen.generate(messages, max_new_tokens=1).prompt_ids == list(want_ids)


def _info() -> TokenizerInfo:
    return TokenizerInfo("tokenizer.json", "chat_template.jinja", "<s>", "</s>", None, 1, (2,), None, True)


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}",
])
def test_template_sandbox_blocks_python_internals(attack):
    template = ChatTemplate(attack, _info())
    with pytest.raises(InputError):
        template.render([{"role": "user", "content": "hi"}])


def test_template_raise_exception_is_an_input_error():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}", _info())
    with pytest.raises(InputError, match="roles must alternate"):
        template.render([{"role": "user", "content": "hi"}])
