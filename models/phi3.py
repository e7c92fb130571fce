"""Phi3ForCausalLM: Llama-shaped layers with Q/K/V in one projection (qkv_proj) and gate/up in one (gate_up_proj)."""

from __future__ import annotations

from .llama import LlamaFamily
from .onnx_ops import cached_attention, rms_norm, rotary, skip_rms_norm
from .registry import register


def phi3_layer_forward(layer, hidden, mask, rope, past_k, past_v):
    attn, cfg = layer.self_attn, layer.self_attn.config
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    x = rms_norm(hidden, layer.input_layernorm)
    q, k, v = attn.qkv_proj(x).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = rotary(q, *rope, heads), rotary(k, *rope, kv_heads)
    x, k, v = cached_attention(q, k, v, past_k, past_v, mask, heads, kv_heads, attn.scaling)
    x, hidden = skip_rms_norm(attn.o_proj(x), hidden, layer.post_attention_layernorm)
    gate, up = layer.mlp.gate_up_proj(x).chunk(2, dim=-1)
    hidden = hidden + layer.mlp.down_proj(up * layer.mlp.activation_fn(gate))
    return hidden, k, v


@register("Phi3ForCausalLM")
class Phi3Family(LlamaFamily):
    """Phi-3 text models. LongRoPE (the 128k variants) and partial rotary (Phi-4-mini) are refused by
    base.check_rope. Phi-3-mini-4k slides a 2047-token window over every layer."""

    name = "phi3"
    model_type = "phi3"
    config_class = "Phi3Config"
    tiny = dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None)
    layer_forward = staticmethod(phi3_layer_forward)
