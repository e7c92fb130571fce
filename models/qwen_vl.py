"""Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration: a ViT over 14-pixel patches at the image's
own (smart-resized) resolution with 2-D rotary positions, merging 2x2 patches into one token, and a Qwen2 LM with
multimodal RoPE (position rows temporal / height / width, rotating their own sections of each head).

The vision graph takes the patches, each patch's (row, column) and block-diagonal attention masks computed by the
runtime (runtime/qwen_vl.py): one block per image, and for Qwen2.5-VL one per window in its windowed layers (the
runtime feeds patches in window order and restores the order of the merged tokens).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from safesteer_runtime import manifest as m
from safesteer_runtime.image_tokens import all_pixels
from safesteer_runtime.manifest import ImageInfo, ModelSizes, Patching

from .base import Family, TextStack, inner_text_stack
from .image_processing import load_processor, preprocessing_fields
from .llama import llama_layer_forward
from .registry import register


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class QwenVision(nn.Module):
    """patches [N, C*T*P*P], positions [N, 2], masks [1, 1, N, N] -> merged tokens [N / merge^2, hidden]."""

    def __init__(self, visual, windowed: bool):
        super().__init__()
        self.visual = visual
        # layers that attend over the whole image; the others (Qwen2.5-VL) within windows
        self.full_layers = set(visual.fullatt_block_indexes) if windowed else set(range(len(visual.blocks)))

    def attention(self, attn, x, cos, sin, mask):
        n, heads = x.shape[0], attn.num_heads
        q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).permute(1, 2, 0, 3).unbind(0)  # [heads, N, d]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        probs = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * attn.scaling + mask[0], dim=-1)
        return attn.proj(torch.matmul(probs, v).transpose(0, 1).reshape(n, -1))

    def forward(self, pixel_values, positions, mask, window_mask=None):
        v = self.visual
        x = v.patch_embed(pixel_values)
        cos, sin = v.rotary_pos_emb(x, positions)  # [N, d]
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        for i, block in enumerate(v.blocks):
            layer_mask = mask if i in self.full_layers else window_mask
            x = x + self.attention(block.attn, block.norm1(x), cos, sin, layer_mask)
            x = x + block.mlp(block.norm2(x))
        return v.merger(x)


@register("Qwen2VLForConditionalGeneration")
class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    layer_forward = staticmethod(llama_layer_forward)

    def text_stack(self) -> TextStack:
        return inner_text_stack(self.model, self.model.model.language_model)

    @property
    def mrope_sections(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.text.config.rope_parameters["mrope_section"])

    def sizes(self) -> ModelSizes:
        return dataclasses.replace(super().sizes(), mrope_sections=self.mrope_sections)

    def rope_inputs(self, position_ids, cos_table, sin_table):
        """position_ids [3, b, s] -> each row's cos/sin [b * s, d / 2] (section i of the half-dims from position row
        i), looked up by a running index: the rotary op's position input then picks each token's own row."""
        sections = torch.zeros(3, cos_table.shape[-1])
        start = 0
        for i, size in enumerate(self.mrope_sections):
            sections[i, start:start + size] = 1.0
            start += size
        picks = sections[:, None, None, :]
        cos = (cos_table[position_ids] * picks).sum(0)
        sin = (sin_table[position_ids] * picks).sum(0)
        rows = torch.cumsum(torch.ones_like(position_ids[0]).flatten(), 0) - 1
        return rows.reshape(position_ids[0].shape), cos.flatten(0, 1), sin.flatten(0, 1)

    def rotary_cos_sin(self, x, positions, kind):
        return self.text.rotary(x, positions.expand(3, -1, -1))

    # --- vision ------------------------------------------------------------------------------------
    def vision_window(self) -> Optional[int]:
        """Qwen2.5-VL's attention window in pixels; None: every vision layer attends over the whole image."""
        return None

    def vision_module(self) -> nn.Module:
        return QwenVision(self.model.model.visual, self.vision_window() is not None).eval()

    def vision_inputs(self) -> list[str]:
        names = [m.PIXEL_VALUES, m.VISION_POSITIONS, m.VISION_MASK]
        return names + ([m.VISION_WINDOW_MASK] if self.vision_window() is not None else [])

    def image_info(self, model_dir: Path, tokenizer) -> Optional[ImageInfo]:
        proc = load_processor(model_dir)
        vision = self.model.config.vision_config
        patching = Patching(patch=int(vision.patch_size), merge=int(vision.spatial_merge_size),
                            temporal=int(vision.temporal_patch_size), min_pixels=int(proc.size["shortest_edge"]),
                            max_pixels=int(proc.size["longest_edge"]), window=self.vision_window())
        side = patching.patch * patching.merge
        cfg = self.model.config
        token = tokenizer.convert_ids_to_tokens
        start, pad, end = (token(i) for i in (cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id))
        # templates write start + pad + end per image; the pad becomes the image's tokens (as Qwen2VLProcessor does)
        return ImageInfo(image_token=pad, image_token_id=cfg.image_token_id, tokens_per_image=1, patching=patching,
                         marker=start + pad + end, prefix=start, suffix=end,
                         **preprocessing_fields(proc, {"height": side, "width": side}))

    def hf_image_kwargs(self, input_ids: torch.Tensor, images: list) -> dict:
        return {"pixel_values": torch.from_numpy(all_pixels(images)),
                "image_grid_thw": torch.tensor([list(image.grid) for image in images]),
                "mm_token_type_ids": (input_ids == self.model.config.image_token_id).int()}

    # --- tests ---------------------------------------------------------------------------------------
    tiny_tokens = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                   "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    tiny_marker = "<|vision_start|><|image_pad|><|vision_end|>"

    @staticmethod
    def tiny_processor(cfg):
        from transformers import Qwen2VLImageProcessorPil

        v = cfg.vision_config
        side = v.patch_size * v.spatial_merge_size
        return Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                        temporal_patch_size=v.temporal_patch_size,
                                        size={"shortest_edge": 4 * side * side, "longest_edge": 48 * side * side})

    @classmethod
    def tiny_vision(cls):
        from transformers import Qwen2VLVisionConfig

        return Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, patch_size=7, spatial_merge_size=2,
                                   temporal_patch_size=2, hidden_size=64)

    config_class = "Qwen2VLConfig"

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        import transformers

        text = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        cfg = getattr(transformers, cls.config_class)(text_config=text, vision_config=cls.tiny_vision().to_dict(),
                                                      tie_word_embeddings=False)
        return {"qwen2": cfg}


@register("Qwen2_5_VLForConditionalGeneration")
class Qwen2_5_VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: RMSNorm / SwiGLU vision blocks, attention within windows except in fullatt_block_indexes."""

    name = "qwen2_5_vl"
    config_class = "Qwen2_5_VLConfig"

    def vision_window(self) -> Optional[int]:
        return int(self.model.config.vision_config.window_size)

    @classmethod
    def tiny_vision(cls):
        from transformers import Qwen2_5_VLVisionConfig

        # windows of 28 pixels = 2x2 merged tokens, so the tests' images span several windows
        return Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=7,
                                      spatial_merge_size=2, temporal_patch_size=2, window_size=28, out_hidden_size=64,
                                      fullatt_block_indexes=[1])
