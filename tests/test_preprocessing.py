"""numpy/Pillow preprocessing == the model's HF image processor; chat templates == transformers; sandboxing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from safesteer_runtime.errors import InputError
from safesteer_runtime.images import preprocess
from safesteer_runtime.manifest import ImageInfo, TokenizerInfo
from safesteer_runtime.text import ChatTemplate
from safesteer_rt import Generator

SIZES = [(224, 224), (300, 200), (199, 401), (17, 23), (640, 480)]  # (width, height)


def processors():
    from transformers import CLIPImageProcessorPil, Gemma3ImageProcessorPil, SiglipImageProcessorPil

    return {
        "clip-336": CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        "siglip-384": SiglipImageProcessorPil(size={"height": 384, "width": 384}),
        "dinov2-224": CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                           image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
        "gemma3-896": Gemma3ImageProcessorPil(size={"height": 896, "width": 896}),
    }


@pytest.mark.parametrize("name", list(processors()))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_pixels_match_hf_processor(tmp_path, name, size, mode):
    from safesteer_models.image_processing import load_processor, preprocessing_fields

    proc = processors()[name]
    proc.save_pretrained(str(tmp_path))  # read back as an exporter reads a checkpoint's processor
    rng = np.random.default_rng(hash((name, size, mode)) % 2**32)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)
    info = ImageInfo(image_token="<image>", image_token_id=5, tokens_per_image=1,
                     **preprocessing_fields(load_processor(tmp_path)))
    want = proc(images=image, return_tensors="np")["pixel_values"][0]
    got = preprocess(image, info)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


TILED = {  # Idefics3's defaults, SmolVLM's (512-pixel tiles), and no splitting
    "idefics3": dict(size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364}),
    "smolvlm": dict(size={"longest_edge": 4 * 512}, max_image_size={"longest_edge": 512}),
    "whole": dict(size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364}, do_image_splitting=False),
}


@pytest.mark.parametrize("name", list(TILED))
@pytest.mark.parametrize("size", SIZES + [(1500, 700), (5000, 300), (364, 364)])
def test_tiles_match_idefics3_processor(tmp_path, name, size):
    """Pixel values of every tile and the whole image, and the tile grid, = Idefics3ImageProcessorPil."""
    from transformers import Idefics3ImageProcessorPil

    from safesteer_models.idefics3 import Idefics3Family
    from safesteer_runtime.images import prepare
    from safesteer_runtime.tiling import idefics3_text

    proc = Idefics3ImageProcessorPil(**TILED[name])
    proc.save_pretrained(str(tmp_path))
    family = Idefics3Family.__new__(Idefics3Family)  # image_info only reads the processor and these config values
    family.model = type("M", (), {"config": type("C", (), {"image_token_id": 5})(),
                                  "model": type("I", (), {"image_seq_len": 3})()})()
    info = family.image_info(tmp_path, type("T", (), {"convert_ids_to_tokens": staticmethod(lambda i: "<image>")}))
    rng = np.random.default_rng(size[0] * 7 + size[1])
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    want = proc(images=[image], return_tensors="np", return_row_col_info=True)
    got = prepare(image, info)
    assert got.pixels.shape == want["pixel_values"][0].shape
    np.testing.assert_allclose(got.pixels, want["pixel_values"][0], atol=1e-5)
    assert got.text == idefics3_text(want["rows"][0][0], want["cols"][0][0], info)


def _tokenizer_naming(ckpt, **tokens):
    """The tiny checkpoint's tokenizer with the attributes a real one of the family names its tokens by."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    for attr, token in tokens.items():
        setattr(tok, attr, token)
        setattr(tok, attr + "_id", tok.convert_tokens_to_ids(token))
    return tok


def _processor_round_trip(tiny, arch, variant, make_processor):
    """Two images of different sizes through the family's HF processor and HF generate == the Generator's own
    prompt expansion, preprocessing and reply."""
    from test_parity_tiny import hf_model, test_image

    ckpt = tiny.checkpoint(arch, variant)
    gen = Generator(tiny.artifact(arch, variant, 2))
    proc = make_processor(ckpt, gen.manifest.image)
    images = [test_image(1, (80, 40)), test_image(2, (23, 61))]
    parts = [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "now."}]
    text = gen.chat.render([{"role": "user", "content": parts}])
    want = proc(text=text, images=images, return_tensors="pt")
    content = [dict(p, image=images[0 if i == 0 else 1]) if p["type"] == "image" else p for i, p in enumerate(parts)]
    result = gen.generate([{"role": "user", "content": content}], max_new_tokens=24)
    assert result.prompt_ids == want["input_ids"][0].tolist()
    model = hf_model(ckpt)
    out = model.generate(**want, max_new_tokens=24, do_sample=False)
    assert result.token_ids == out[0, want["input_ids"].shape[1]:].tolist()
    return want


def test_gemma3_prompt_and_reply_match_hf_processor(tiny):
    """Also: an image's tokens attend both ways (HF: the processor's token_type_ids)."""
    from transformers import AutoImageProcessor, Gemma3Processor

    def make(ckpt, info):
        tok = _tokenizer_naming(ckpt, boi_token="<start_of_image>", eoi_token="<end_of_image>",
                                image_token="<image_soft_token>")
        return Gemma3Processor(image_processor=AutoImageProcessor.from_pretrained(str(ckpt)), tokenizer=tok,
                               image_seq_length=info.tokens_per_image)

    want = _processor_round_trip(tiny, "Gemma3ForConditionalGeneration", "siglip", make)
    assert want["token_type_ids"].sum() == 2 * 16


def test_idefics3_prompt_and_reply_match_hf_processor(tiny):
    """Tiles by row and column plus the whole image, for two images of different aspect ratios."""
    from transformers import AutoImageProcessor, Idefics3Processor

    def make(ckpt, info):
        return Idefics3Processor(image_processor=AutoImageProcessor.from_pretrained(str(ckpt)),
                                 tokenizer=_tokenizer_naming(ckpt), image_seq_len=info.tokens_per_image)

    want = _processor_round_trip(tiny, "Idefics3ForConditionalGeneration", "llama", make)
    assert want["pixel_values"].shape[1] > 2  # the images were tiled


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
