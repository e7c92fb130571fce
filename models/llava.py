"""LlavaForConditionalGeneration: a vision tower (CLIP, SigLIP or DINOv2), a projector, a Llama/Qwen2 LM; and
LlavaNextForConditionalGeneration, the same per tile of an any-resolution grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from safesteer_runtime.errors import UnsupportedArchitectureError
from safesteer_runtime import manifest as m
from safesteer_runtime.image_tokens import all_pixels
from safesteer_runtime.manifest import ImageInfo, Tiling

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


class LlavaNextVision(LlavaVision):
    """LlavaVision per tile, plus the newline feature the runtime appends to each row of an image's tile grid."""

    def __init__(self, tower, projector, feature_layer, strategy, newline):
        super().__init__(tower, projector, feature_layer, strategy)
        self.newline = newline

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(pixel_values), self.newline * 1.0


@register("LlavaNextForConditionalGeneration")
class LlavaNextFamily(LlavaFamily):
    """LLaVA-NeXT (LLaVA 1.6): any-resolution tiling (runtime/tiling.py, kind "anyres")."""

    name = "llava_next"

    def vision_module(self) -> nn.Module:
        cfg = self.model.config
        return LlavaNextVision(self.model.model.vision_tower, self.model.model.multi_modal_projector,
                               cfg.vision_feature_layer, cfg.vision_feature_select_strategy,
                               self.model.model.image_newline).eval()

    def vision_outputs(self) -> list[str]:
        return [m.IMAGE_FEATURES, m.IMAGE_NEWLINE]

    def image_info(self, model_dir: Path, tokenizer) -> Optional[ImageInfo]:
        proc = load_processor(model_dir)
        cfg = self.model.config
        tile = int(cfg.vision_config.image_size)
        grid = tuple((int(h), int(w)) for h, w in cfg.image_grid_pinpoints)
        if tuple(tuple(int(x) for x in p) for p in proc.image_grid_pinpoints) != grid:
            raise UnsupportedArchitectureError(
                "the image processor's image_grid_pinpoints differ from the model config's; make them equal")
        info = ImageInfo(image_token=tokenizer.convert_ids_to_tokens(cfg.image_token_id),
                         image_token_id=cfg.image_token_id, tokens_per_image=0,
                         tiling=Tiling(kind="anyres", tile=tile, grid=grid), **preprocessing_fields(proc))
        if info.pixel_size != (tile, tile):
            raise UnsupportedArchitectureError(f"LLaVA-NeXT tiles of {info.pixel_size} pixels for a {tile}-pixel "
                                               "vision tower are not supported")
        with torch.no_grad():
            tokens = self.vision_module()(torch.zeros(1, 3, tile, tile))[0].shape[1]
        return dataclasses.replace(info, tokens_per_image=int(tokens))

    def hf_image_kwargs(self, input_ids: torch.Tensor, images: list) -> dict:
        return {"pixel_values": torch.from_numpy(all_pixels(images)),
                "image_sizes": torch.tensor([list(image.size) for image in images])}

    @staticmethod
    def tiny_processor(cfg):
        from transformers import LlavaNextImageProcessorPil

        tile = cfg.vision_config.image_size
        return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                          image_grid_pinpoints=cfg.image_grid_pinpoints)

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        from transformers import CLIPVisionConfig, LlavaNextConfig

        from .llama import Qwen2Family

        # 28-pixel tiles of 2x2 patches (CLS dropped: 4 tokens each); grids up to 3 tiles wide or tall
        vision = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4)
        grid = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
        return {"clip-qwen2": LlavaNextConfig(vision_config=vision, text_config=Qwen2Family.text_config(vocab_size),
                                              image_grid_pinpoints=grid, tie_word_embeddings=False)}
