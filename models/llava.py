"""LlavaForConditionalGeneration: a vision tower (CLIP, SigLIP or DINOv2), a projector, a Llama/Qwen2 LM."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from safesteer_runtime.errors import UnsupportedArchitectureError
from safesteer_runtime.manifest import ImageInfo

from .base import TextStack, inner_text_stack
from .image_processing import load_processor, preprocessing_fields
from .llama import WithLlamaText
from .registry import register

VISION_TOWERS = ("clip_vision_model", "siglip_vision_model", "dinov2")


class LlavaVision(nn.Module):
    """pixel_values -> tower hidden states at the feature layer -> (drop CLS) -> projector."""

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layer: int, strategy: str):
        super().__init__()
        if not isinstance(feature_layer, int):
            raise UnsupportedArchitectureError(
                "LLaVA checkpoints with a list of vision_feature_layer values are not supported yet"
            )
        self.tower, self.projector = tower, projector
        self.feature_layer, self.strategy = feature_layer, strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        if self.strategy == "default":
            states = states[:, 1:]
        return self.projector(states)


@register("LlavaForConditionalGeneration")
class LlavaFamily(WithLlamaText):
    name = "llava"

    def __init__(self, model: nn.Module):
        tower = model.config.vision_config.model_type
        if tower not in VISION_TOWERS:
            raise UnsupportedArchitectureError(
                f"LLaVA with a {tower!r} vision tower is not supported; supported: {list(VISION_TOWERS)}")
        super().__init__(model)

    def text_stack(self) -> TextStack:
        return inner_text_stack(self.model, self.model.model.language_model)

    def vision_module(self) -> nn.Module:
        cfg = self.model.config
        return LlavaVision(
            self.model.model.vision_tower,
            self.model.model.multi_modal_projector,
            cfg.vision_feature_layer,
            cfg.vision_feature_select_strategy,
        ).eval()

    def image_info(self, model_dir: Path, tokenizer) -> Optional[ImageInfo]:
        image_token_id = self.model.config.image_token_id
        info = ImageInfo(image_token=tokenizer.convert_ids_to_tokens(image_token_id), image_token_id=image_token_id,
                         tokens_per_image=0, **preprocessing_fields(load_processor(model_dir)))
        with torch.no_grad():
            tokens = self.vision_module()(torch.zeros(1, 3, *info.pixel_size)).shape[1]
        return dataclasses.replace(info, tokens_per_image=int(tokens))

    @staticmethod
    def tiny_processor(cfg):
        from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

        if cfg.vision_config.model_type == "siglip_vision_model":
            return SiglipImageProcessorPil(size={"height": 28, "width": 28})
        return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        from transformers import CLIPVisionConfig, Dinov2Config, LlavaConfig, SiglipVisionConfig

        from .llama import LlamaFamily, Qwen2Family

        def llava(vision, text, **kw):
            return LlavaConfig(
                vision_config=vision, text_config=text, image_token_id=vocab_size - 1,
                tie_word_embeddings=text.tie_word_embeddings, **kw,
            )

        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        return {
            "clip-llama": llava(
                CLIPVisionConfig(image_size=28, patch_size=14, **small), LlamaFamily.text_config(vocab_size)
            ),
            "siglip-qwen2": llava(
                SiglipVisionConfig(image_size=28, patch_size=14, **small),
                Qwen2Family.text_config(vocab_size, tie_word_embeddings=True),
                vision_feature_select_strategy="full",
                vision_feature_layer=-1,
            ),
            "dinov2-llama": llava(
                Dinov2Config(image_size=28, patch_size=14, **small), LlamaFamily.text_config(vocab_size)
            ),
        }
