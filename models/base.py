"""What every family provides to the exporter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch import nn

from safesteer_runtime.image_tokens import all_pixels
from safesteer_runtime import manifest as m
from safesteer_runtime.manifest import ImageInfo, ModelSizes


@dataclass
class TextStack:
    """The language-model parts of a checkpoint, wherever the architecture nests them."""

    config: object
    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module


def inner_text_stack(model, lm) -> TextStack:
    """The language model ``lm`` inside a multimodal checkpoint (its head is the checkpoint's lm_head)."""
    return TextStack(config=model.config.text_config, embed_tokens=lm.embed_tokens, layers=lm.layers, norm=lm.norm,
                     lm_head=model.lm_head, rotary=lm.rotary_emb)


def check_rope(cfg) -> None:
    """The graphs look RoPE rows up in tables computed once for every position; scalings whose frequencies depend
    on the sequence length (dynamic NTK, LongRoPE) or that rotate only part of each head cannot be tabled so."""
    from safesteer_runtime.errors import UnsupportedArchitectureError

    rope = getattr(cfg, "rope_parameters", None) or {}
    for params in [v for v in rope.values() if isinstance(v, dict)] or [rope]:  # Gemma 3: one set per layer kind
        kind = params.get("rope_type", "default")
        if kind in ("dynamic", "longrope"):
            raise UnsupportedArchitectureError(f"{cfg.model_type} checkpoints with {kind!r} RoPE scaling (frequencies "
                                               "that change with the sequence length) are not supported yet")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedArchitectureError(f"{cfg.model_type} checkpoints with partial rotary embeddings "
                                               f"(partial_rotary_factor {params['partial_rotary_factor']}) are not "
                                               "supported yet")


class Family:
    """Base class of a registered architecture. Subclasses fill in the parts that differ."""

    architectures: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = ""
    window: Optional[int] = None  # the sliding window of the layers in sliding_layers (llama.attention_window)
    sliding_layers: frozenset = frozenset()
    final_logit_softcap: Optional[float] = None  # logits = cap * tanh(logits / cap) after the LM head (Gemma 2)
    # some rows of a prefill see later rows (an image's tokens attend both ways: Gemma 3); ImageInfo.bidirectional
    bidirectional_images: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.text = self.text_stack()
        check_rope(self.text.config)

    # --- parts -------------------------------------------------------------------------------
    def text_stack(self) -> TextStack:
        raise NotImplementedError

    def sizes(self) -> ModelSizes:
        cfg = self.text.config
        heads = cfg.num_attention_heads
        return ModelSizes(
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings,
            sliding_window=self.window,
        )

    # --- computation (what goes into the graphs) ----------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text.embed_tokens(input_ids)

    def rope_kind(self, layer: int) -> str:
        """Which rotary table layer ``layer`` reads (Gemma 3: local and global layers use different bases)."""
        return "default"

    @torch.no_grad()
    def rope_tables(self, kind: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of position * frequency, [max_positions, head_dim / 2], from the checkpoint's own rotary
        module (so its scaling variant is kept); the graphs look rows up by position id."""
        from safesteer_runtime.errors import UnsupportedArchitectureError

        sizes = self.sizes()
        positions = torch.arange(sizes.max_positions)[None]
        cos, sin = self.rotary_cos_sin(torch.zeros(1, 1, sizes.hidden_size), positions, kind)
        half = sizes.head_dim // 2
        if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
            raise UnsupportedArchitectureError("this checkpoint's rotary embedding is not in rotate-half layout")
        return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()

    def rotary_cos_sin(self, x: torch.Tensor, positions: torch.Tensor, kind: str):
        return self.text.rotary(x, positions)

    def rope_inputs(self, position_ids: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor):
        """The block's position_ids input and a kind's tables -> what each layer's rotary op takes (ids, cos, sin):
        the tables themselves, looked up by position (multimodal RoPE assembles per-token rows instead)."""
        return position_ids, cos_table, sin_table

    def layer_forward(self, layer, hidden, mask, rope, past_k, past_v):
        """One decoder layer: returns (hidden, new_k, new_v); K/V are [batch, seq, kv_heads * head_dim].
        ``rope`` = (position_ids, cos table, sin table)."""
        raise NotImplementedError

    def vision_module(self) -> Optional[nn.Module]:
        """pixel_values -> image features in the LM embedding space, or None for text-only families."""
        return None

    def vision_inputs(self) -> list[str]:
        """The vision module's inputs, in order, by graph input name."""
        return [m.PIXEL_VALUES]

    def vision_outputs(self) -> list[str]:
        """The vision module's outputs, in order, by graph output name."""
        return [m.IMAGE_FEATURES]

    def image_info(self, model_dir: Path, tokenizer) -> Optional[ImageInfo]:
        return None

    def hf_image_kwargs(self, input_ids: torch.Tensor, images: list) -> dict:
        """What the Hugging Face model's forward / generate takes besides input_ids for a prompt with ``images``
        (runtime PreparedImage, in prompt order): the PyTorch side of validation, calibration, the oracle and the
        parity tests."""
        return {"pixel_values": torch.from_numpy(all_pixels(images))}

    # --- tests ---------------------------------------------------------------------------------
    tiny_tokens: ClassVar[dict[str, str]] = {"image_token_id": "<image>"}  # config attribute -> special token
    tiny_marker: ClassVar[str] = "<image>"  # what the tiny chat template writes for an image part
    tiny_extra_tokens: ClassVar[tuple[str, ...]] = ()  # more special tokens the family's prompts use

    @staticmethod
    def tiny_processor(cfg):
        """The HF image processor saved beside a tiny checkpoint with images."""
        raise NotImplementedError

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        """Random-init configs small enough for CPU tests, by variant name (a test covers each)."""
        raise NotImplementedError
