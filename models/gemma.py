"""Gemma 2 and Gemma 3 text models: RMSNorms that scale by (1 + weight), a norm after attention and around the MLP,
query scaling by query_pre_attn_scalar, embeddings scaled by sqrt(hidden) (inside the checkpoint's embedding module);
Gemma 2 soft-caps attention scores and final logits, Gemma 3 normalises Q and K per head and gives its local
(sliding) and global layers different RoPE bases. Sliding-window layers mix with full ones."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from safesteer_runtime.errors import UnsupportedArchitectureError
from safesteer_runtime.manifest import ImageInfo

from .base import TextStack, inner_text_stack
from .image_processing import load_processor, preprocessing_fields
from .llama import LlamaFamily
from .onnx_ops import cached_attention, rms_norm, rotary
from .registry import register


def _per_head_norm(x, norm, heads: int):
    """Gemma 3's q_norm / k_norm: RMSNorm over each head's dims of x [b, s, heads * d]."""
    b, s, width = x.shape
    return rms_norm(x.reshape(b, s, heads, width // heads), norm, offset=1.0).reshape(b, s, width)


def gemma_layer_forward(layer, hidden, mask, rope, past_k, past_v):
    attn, cfg = layer.self_attn, layer.self_attn.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    x = rms_norm(hidden, layer.input_layernorm, offset=1.0)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if hasattr(attn, "q_norm"):  # Gemma 3
        q, k = _per_head_norm(q, attn.q_norm, heads), _per_head_norm(k, attn.k_norm, kv_heads)
    q, k = rotary(q, *rope, heads), rotary(k, *rope, kv_heads)
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    x, k, v = cached_attention(q, k, v, past_k, past_v, mask, heads, kv_heads, attn.scaling, softcap)
    x = attn.o_proj(x)
    hidden = hidden + rms_norm(x, layer.post_attention_layernorm, offset=1.0)
    x = layer.mlp(rms_norm(hidden, layer.pre_feedforward_layernorm, offset=1.0))
    hidden = hidden + rms_norm(x, layer.post_feedforward_layernorm, offset=1.0)
    return hidden, k, v


@register("Gemma2ForCausalLM")
class Gemma2Family(LlamaFamily):
    name = "gemma2"
    model_type = "gemma2"
    config_class = "Gemma2Config"
    tiny = dict(num_key_value_heads=2, tie_word_embeddings=False, head_dim=16, query_pre_attn_scalar=16,
                sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    layer_forward = staticmethod(gemma_layer_forward)
    # untied in the tiny configs: with random weights, a tied table times Gemma's sqrt(hidden) embedding scale makes
    # the model repeat its input token, too weak a parity check (tied tables are covered by the Llama configs)

    @property
    def final_logit_softcap(self):
        return getattr(self.text.config, "final_logit_softcapping", None)


@register("Gemma3ForCausalLM")
class Gemma3TextFamily(Gemma2Family):
    name = "gemma3_text"
    model_type = "gemma3_text"
    config_class = "Gemma3TextConfig"
    tiny = {**{k: v for k, v in Gemma2Family.tiny.items() if not k.endswith("softcapping")}, "num_key_value_heads": 1,
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}

    def rope_kind(self, layer: int) -> str:
        return self.text.config.layer_types[layer]

    def rotary_cos_sin(self, x, positions, kind):
        return self.text.rotary(x, positions, kind)


class Gemma3Vision(torch.nn.Module):
    """pixel_values -> SigLIP last hidden state -> average-pooled to mm_tokens_per_image -> RMSNorm -> projection."""

    def __init__(self, tower, projector):
        super().__init__()
        self.tower, self.projector = tower, projector

    def forward(self, pixel_values):
        return self.projector(self.tower(pixel_values=pixel_values).last_hidden_state)


@register("Gemma3ForConditionalGeneration")
class Gemma3Family(Gemma3TextFamily):
    """Gemma 3 with images: each image is "\\n\\n<start_of_image>" + mm_tokens_per_image soft tokens + "<end_of_image>\\n\\n"
    (templates write <start_of_image> once per image), and an image's soft tokens attend to each other in both
    directions at prefill (Hugging Face does so when generate gets token_type_ids, as its processor returns)."""

    name = "gemma3"
    bidirectional_images = True

    def text_stack(self) -> TextStack:
        return inner_text_stack(self.model, self.model.model.language_model)

    def vision_module(self) -> torch.nn.Module:
        return Gemma3Vision(self.model.model.vision_tower, self.model.model.multi_modal_projector).eval()

    def image_info(self, model_dir: Path, tokenizer) -> Optional[ImageInfo]:
        proc = load_processor(model_dir)
        if getattr(proc, "do_pan_and_scan", None):
            raise UnsupportedArchitectureError(
                "Gemma 3 pan-and-scan crops are not supported yet; set do_pan_and_scan to false in the checkpoint's "
                "preprocessor_config.json (Hugging Face's default) to export it")
        cfg = self.model.config
        token = tokenizer.convert_ids_to_tokens
        return ImageInfo(image_token=token(cfg.image_token_id), image_token_id=cfg.image_token_id,
                         tokens_per_image=int(cfg.mm_tokens_per_image), marker=token(cfg.boi_token_id),
                         prefix="\n\n" + token(cfg.boi_token_id), suffix=token(cfg.eoi_token_id) + "\n\n",
                         bidirectional=self.bidirectional_images, **preprocessing_fields(proc))

    def hf_image_kwargs(self, input_ids: torch.Tensor, images: list) -> dict:
        return {**super().hf_image_kwargs(input_ids, images),
                "token_type_ids": (input_ids == self.model.config.image_token_id).long()}

    tiny_tokens = {"image_token_id": "<image_soft_token>", "boi_token_id": "<start_of_image>",
                   "eoi_token_id": "<end_of_image>"}
    tiny_marker = "<start_of_image>"

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        from transformers import Gemma3Config, SiglipVisionConfig

        # 8x8 patches pooled to 16 tokens: an image's run is longer than the 8-token window of the sliding layers
        vision = SiglipVisionConfig(image_size=56, patch_size=7, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4)
        return {"siglip": Gemma3Config(text_config=cls.text_config(vocab_size), vision_config=vision,
                                       mm_tokens_per_image=16, tie_word_embeddings=False)}

    @staticmethod
    def tiny_processor(cfg):
        from transformers import Gemma3ImageProcessorPil

        size = cfg.vision_config.image_size
        return Gemma3ImageProcessorPil(size={"height": size, "width": size})
