"""Llama-style decoders: LlamaForCausalLM and Qwen2ForCausalLM (Qwen2's q/k/v biases live in its Linears)."""

from __future__ import annotations

import torch

from .base import Family, TextStack
from .onnx_ops import attention, rms_norm, rotary, skip_rms_norm
from .registry import register


def llama_layer_forward(layer, hidden, mask, rope, past_k, past_v):
    """``rope``: (position_ids [b, s], cos table, sin table), see Family.rope_tables."""
    attn, cfg = layer.self_attn, layer.self_attn.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    x = rms_norm(hidden, layer.input_layernorm)
    q = rotary(attn.q_proj(x), *rope, heads)
    k = rotary(attn.k_proj(x), *rope, kv_heads)  # [b, s, kv_heads * d]: the new cache rows
    v = attn.v_proj(x)
    keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)
    x, hidden = skip_rms_norm(attn.o_proj(attention(q, keys, values, mask, heads, kv_heads, attn.scaling)), hidden,
                              layer.post_attention_layernorm)
    hidden = hidden + layer.mlp(x)
    return hidden, k, v


def attention_window(cfg) -> int | None:
    """The sliding window of the checkpoint's sliding-window layers (None: every layer attends fully). Within a
    context no longer than the window, a sliding layer sees exactly what a full layer sees, so such models are
    served with their context capped at the window (Family.sizes); longer contexts need a windowed mask per layer
    kind, which the runtime does not build yet."""
    from safesteer_runtime.errors import UnsupportedArchitectureError

    kinds = set(getattr(cfg, "layer_types", None) or [])
    if kinds - {"full_attention", "sliding_attention"}:
        raise UnsupportedArchitectureError(f"{cfg.model_type} layer kinds {sorted(kinds)} are not supported yet")
    if kinds == {"full_attention"} or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return getattr(cfg, "sliding_window", None)


def causal_lm_stack(model) -> TextStack:
    return TextStack(
        config=model.config,
        embed_tokens=model.model.embed_tokens,
        layers=model.model.layers,
        norm=model.model.norm,
        lm_head=model.lm_head,
        rotary=model.model.rotary_emb,
    )


@register("LlamaForCausalLM")
class LlamaFamily(Family):
    name = "llama"
    model_type = "llama"

    def __init__(self, model):
        super().__init__(model)
        self.window = attention_window(self.text.config)

    def text_stack(self) -> TextStack:
        return causal_lm_stack(self.model)

    layer_forward = staticmethod(llama_layer_forward)

    config_class = "LlamaConfig"
    tiny = dict(num_key_value_heads=2, tie_word_embeddings=True)  # what the tiny test config varies

    @classmethod
    def text_config(cls, vocab_size: int, **overrides):
        import transformers

        kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2, **cls.tiny)
        kw.update(overrides)
        return getattr(transformers, cls.config_class)(**kw)

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        return {"gqa": cls.text_config(vocab_size)}


@register("Qwen2ForCausalLM")
class Qwen2Family(LlamaFamily):
    name = "qwen2"
    model_type = "qwen2"
    config_class = "Qwen2Config"
    tiny = dict(num_key_value_heads=1, tie_word_embeddings=False)


@register("MistralForCausalLM")
class MistralFamily(LlamaFamily):
    """Llama layers; Mistral 7B v0.1 slides a 4096-token window over every layer (context capped there), v0.2+
    attend fully."""

    name = "mistral"
    model_type = "mistral"
    config_class = "MistralConfig"
    tiny = dict(num_key_value_heads=2, tie_word_embeddings=False, head_dim=24, sliding_window=None)

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        # head_dim 24 with hidden 64 / 4 heads: Mistral's head_dim is its own setting; the windowed variant's
        # context is capped at its 128 positions
        return {"gqa": cls.text_config(vocab_size), "window": cls.text_config(vocab_size, sliding_window=128)}


# Text families a multimodal wrapper (LLaVA) can hold, by the text config's model_type.
TEXT_FAMILIES = {cls.model_type: cls for cls in (LlamaFamily, Qwen2Family, MistralFamily)}
