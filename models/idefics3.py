"""Idefics3ForConditionalGeneration (Idefics3, SmolVLM): a SigLIP-style vision transformer over fixed-size tiles, a
pixel-shuffle connector (scale_factor^2 neighbouring patches folded into one token, then a Linear), a Llama LM.
Images are cut into tiles plus a downscaled whole image (runtime/tiling.py, kind "idefics3")."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from safesteer_runtime.image_tokens import all_pixels
from safesteer_runtime.manifest import ImageInfo, Tiling

from .base import TextStack, inner_text_stack
from .image_processing import load_processor, preprocessing_fields
from .llama import WithLlamaText
from .registry import register


class Idefics3Vision(nn.Module):
    """tiles [n, 3, S, S] -> patch embeddings + positions -> encoder -> post norm -> pixel shuffle + projection.
    Every tile is a full S x S crop, so patch i has position i (Hugging Face's bucketed positions reduce to that
    when no patch is padding) and no attention mask is needed."""

    def __init__(self, vision, connector):
        super().__init__()
        self.vision, self.connector = vision, connector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.vision.embeddings
        x = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding.weight[None]
        x = self.vision.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
        return self.connector(self.vision.post_layernorm(x))


@register("Idefics3ForConditionalGeneration")
class Idefics3Family(WithLlamaText):
    name = "idefics3"

    def text_stack(self) -> TextStack:
        return inner_text_stack(self.model, self.model.model.text_model)

    def vision_module(self) -> nn.Module:
        return Idefics3Vision(self.model.model.vision_model, self.model.model.connector).eval()

    def image_info(self, model_dir: Path, tokenizer) -> Optional[ImageInfo]:
        proc = load_processor(model_dir)
        tile = int(proc.max_image_size["longest_edge"])
        tiling = Tiling(kind="idefics3", tile=tile, split=bool(proc.do_image_splitting),
                        longest_edge=int(proc.size["longest_edge"]) if proc.do_resize else None)
        cfg = self.model.config
        return ImageInfo(image_token=tokenizer.convert_ids_to_tokens(cfg.image_token_id),
                         image_token_id=cfg.image_token_id, tokens_per_image=int(self.model.model.image_seq_len),
                         tiling=tiling, **preprocessing_fields(proc, {"height": tile, "width": tile}))

    def hf_image_kwargs(self, input_ids: torch.Tensor, images: list) -> dict:
        return {"pixel_values": torch.from_numpy(all_pixels(images))[None]}  # [batch 1, tiles, 3, S, S]

    tiny_extra_tokens = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")

    tiny_processor_class = "Idefics3ImageProcessorPil"

    @classmethod
    def tiny_processor(cls, cfg):
        import transformers

        tile = cfg.vision_config.image_size
        return getattr(transformers, cls.tiny_processor_class)(size={"longest_edge": 3 * tile},
                                                               max_image_size={"longest_edge": tile})

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        from transformers import Idefics3Config, Idefics3VisionConfig

        from .llama import LlamaFamily

        vision = Idefics3VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4)
        # 4x4 patches, pixel shuffle by 2: 4 tokens per tile; images of the tests' sizes become 2x3 or 3x3 tiles
        return {"llama": Idefics3Config(vision_config=vision, text_config=LlamaFamily.text_config(vocab_size),
                                        scale_factor=2, tie_word_embeddings=True)}


@register("SmolVLMForConditionalGeneration")
class SmolVLMFamily(Idefics3Family):
    """SmolVLM 2: Idefics3's layout, processor and prompt format under its own class names."""

    name = "smolvlm"

    tiny_processor_class = "SmolVLMImageProcessorPil"

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        from transformers import SmolVLMConfig

        (idefics3,) = Idefics3Family.tiny_configs(vocab_size).values()
        return {"llama": SmolVLMConfig(vision_config=idefics3.vision_config.to_dict(),
                                       text_config=idefics3.text_config.to_dict(), scale_factor=2,
                                       tie_word_embeddings=True)}
