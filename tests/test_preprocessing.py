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
# Each family with images -> the test comparing its preprocessing with its HF processor (a meta-test checks this).
PREPROCESSING_TESTS = {
    "LlavaForConditionalGeneration": "test_pixels_match_hf_processor",
    "Gemma3ForConditionalGeneration": "test_gemma3_prompt_and_reply_match_hf_processor",
    "Idefics3ForConditionalGeneration": "test_idefics3_prompt_and_reply_match_hf_processor",
    "SmolVLMForConditionalGeneration": "test_tiles_match_idefics3_processor",
    "LlavaNextForConditionalGeneration": "test_llava_next_prompt_and_reply_match_hf_processor",
    "Qwen2VLForConditionalGeneration": "test_qwen_vl_two_images_match_transformers",
    "Qwen2_5_VLForConditionalGeneration": "test_qwen_vl_two_images_match_transformers",
}


def processors():
    from transformers import (CLIPImageProcessorPil, Gemma3ImageProcessorPil, LlavaImageProcessorPil,
                              SiglipImageProcessorPil)

    return {
        "clip-336": CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        "siglip-384": SiglipImageProcessorPil(size={"height": 384, "width": 384}),
        "dinov2-224": CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                           image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
        "gemma3-896": Gemma3ImageProcessorPil(size={"height": 896, "width": 896}),
        # the default model's: pad to a square of the mean colour, so the whole canvas is seen
        "llava-pad-224": LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 224},
                                                crop_size={"height": 224, "width": 224},
                                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
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


@pytest.mark.parametrize("processor", ["Idefics3ImageProcessorPil", "SmolVLMImageProcessorPil"])
@pytest.mark.parametrize("name", list(TILED))
@pytest.mark.parametrize("size", SIZES + [(1500, 700), (5000, 300), (364, 364)])
def test_tiles_match_idefics3_processor(tmp_path, processor, name, size):
    """Pixel values of every tile and the whole image, and the tile grid, = Idefics3's (and SmolVLM's) processor."""
    import transformers

    from safesteer_models.idefics3 import Idefics3Family
    from safesteer_runtime.images import prepare
    from safesteer_runtime.tiling import idefics3_text

    proc = getattr(transformers, processor)(**TILED[name])
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


GRIDS = {  # LLaVA-NeXT 1.6's grid, and a wider one with more tiles
    "llava-v1.6": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "wide": [[336, 336], [336, 1344], [1344, 336], [672, 1008], [1008, 672]],
}


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("size", SIZES + [(1500, 700), (300, 1400), (336, 336)])
def test_anyres_tiles_match_llava_next_processor(name, size):
    """Pixel values of the whole image and every tile = LlavaNextImageProcessorPil; the image's token count =
    LlavaNextProcessor's (which the model's feature layout must fill exactly)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from safesteer_models.image_processing import preprocessing_fields
    from safesteer_runtime.images import prepare
    from safesteer_runtime.manifest import Tiling

    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_grid_pinpoints=GRIDS[name])
    info = ImageInfo(image_token="<image>", image_token_id=5, tokens_per_image=576,
                     tiling=Tiling(kind="anyres", tile=336, grid=tuple(map(tuple, GRIDS[name]))),
                     **preprocessing_fields(proc))
    rng = np.random.default_rng(size[0] * 7 + size[1])
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    want = proc(images=[image], return_tensors="np")
    got = prepare(image, info)
    assert got.pixels.shape == want["pixel_values"][0].shape
    np.testing.assert_allclose(got.pixels, want["pixel_values"][0], atol=1e-5)
    tok = type("Tok", (), {"image_token": "<image>", "image_token_id": 5})()
    counter = LlavaNextProcessor.__new__(LlavaNextProcessor)  # only its token arithmetic, no tokenizer needed
    counter.image_processor, counter.patch_size, counter.num_additional_image_tokens = proc, 14, 1
    counter.vision_feature_select_strategy, counter.tokenizer = "default", tok
    assert len(got.text) // len("<image>") == counter._get_number_of_features(size[1], size[0], 336, 336) - 1


PATCHING = {  # Qwen2-VL's processor defaults, and a small pixel budget that forces downscaling
    "qwen2-vl": dict(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}),
    "small-budget": dict(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}),
}


@pytest.mark.parametrize("name", list(PATCHING))
@pytest.mark.parametrize("size", SIZES + [(1500, 700), (300, 1400), (28, 28)])
def test_patches_match_qwen2vl_processor(name, size):
    """Patches and grid = Qwen2VLImageProcessorPil; patch positions and Qwen2.5-VL's window order = transformers'
    vision_utils (what the vision model computes from the grid)."""
    import torch
    from transformers import Qwen2VLImageProcessorPil
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    from safesteer_models.image_processing import preprocessing_fields
    from safesteer_runtime import manifest as m
    from safesteer_runtime.image_tokens import vision_inputs
    from safesteer_runtime.images import prepare
    from safesteer_runtime.manifest import Patching

    proc = Qwen2VLImageProcessorPil(**PATCHING[name])
    patching = Patching(patch=14, merge=2, temporal=2, min_pixels=proc.size["shortest_edge"],
                        max_pixels=proc.size["longest_edge"], window=112)
    info = ImageInfo(image_token="<|image_pad|>", image_token_id=5, tokens_per_image=1, patching=patching,
                     **preprocessing_fields(proc, {"height": 28, "width": 28}))
    rng = np.random.default_rng(size[0] * 7 + size[1])
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    want = proc(images=[image], return_tensors="np")
    got = prepare(image, info)
    assert list(got.grid) == want["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(got.pixels, want["pixel_values"], atol=1e-5)
    assert got.text.count("<|image_pad|>") == int(np.prod(got.grid)) // 4
    grid = torch.tensor([got.grid])
    windows, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    feeds, order = vision_inputs([got], info)
    positions = get_vision_position_ids(grid, 2).numpy()
    assert np.array_equal(feeds[m.VISION_POSITIONS], positions.reshape(-1, 4, 2)[windows.numpy()].reshape(-1, 2))
    assert np.array_equal(order, np.argsort(windows.numpy()))


@pytest.mark.parametrize("arch", ["Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"])
def test_qwen_vl_two_images_match_transformers(tiny, arch):
    """Two images of different sizes: M-RoPE positions = get_rope_index, and 24 greedy tokens = transformers fed the
    image processor's own patches (Qwen2VLProcessor itself needs torchvision, absent beside the CPU torch wheel)."""
    import torch
    from transformers import AutoImageProcessor

    from safesteer_runtime.image_tokens import image_runs
    from safesteer_runtime.images import prepare
    from safesteer_runtime.qwen_vl import mrope_positions
    from test_parity_tiny import hf_model, test_image

    variant = "qwen2"
    ckpt = tiny.checkpoint(arch, variant)
    gen = Generator(tiny.artifact(arch, variant, 2))
    images = [test_image(1, (80, 40)), test_image(2, (23, 61))]
    content = [{"type": "image", "image": images[0]}, {"type": "text", "text": "Compare"},
               {"type": "image", "image": images[1]}, {"type": "text", "text": "now."}]
    result = gen.generate([{"role": "user", "content": content}], max_new_tokens=24)
    want = AutoImageProcessor.from_pretrained(str(ckpt))(images=images, return_tensors="pt")
    info = gen.manifest.image
    ids = torch.tensor([result.prompt_ids])
    kinds = (ids == info.image_token_id).int()
    model = hf_model(ckpt)
    hf_positions, hf_delta = model.model.get_rope_index(ids, mm_token_type_ids=kinds,
                                                        image_grid_thw=want["image_grid_thw"])
    prepared = [prepare(im, info) for im in images]
    ours, delta = mrope_positions(ids[0].numpy(), prepared, info, image_runs(ids[0].numpy(), info.image_token_id))
    assert np.array_equal(ours, hf_positions.numpy()) and delta == int(hf_delta)
    out = model.generate(ids, pixel_values=want["pixel_values"], image_grid_thw=want["image_grid_thw"],
                         mm_token_type_ids=kinds, max_new_tokens=24, do_sample=False)
    assert result.token_ids == out[0, ids.shape[1]:].tolist()


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


def test_llava_next_prompt_and_reply_match_hf_processor(tiny):
    """Any-resolution grids for two images of different aspect ratios: token counts and the packed feature layout
    (unpadding, newline after each row) against LlavaNextProcessor + transformers."""
    from transformers import AutoImageProcessor, LlavaNextProcessor

    def make(ckpt, info):
        return LlavaNextProcessor(image_processor=AutoImageProcessor.from_pretrained(str(ckpt)),
                                  tokenizer=_tokenizer_naming(ckpt), patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)

    want = _processor_round_trip(tiny, "LlavaNextForConditionalGeneration", "clip-qwen2", make)
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
