"""Gemma 2 and Gemma 3 text models: RMSNorms that scale by (1 + weight), a norm after attention and around the MLP,
query scaling by query_pre_attn_scalar, embeddings scaled by sqrt(hidden) (inside the checkpoint's embedding module);
Gemma 2 soft-caps attention scores and final logits, Gemma 3 normalises Q and K per head and gives its local
(sliding) and global layers different RoPE bases. Sliding-window layers mix with full ones."""

from __future__ import annotations

from .llama import LlamaFamily
from .onnx_ops import attention, rms_norm, rotary
from .registry import register

import torch


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
    keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    x = attn.o_proj(attention(q, keys, values, mask, heads, kv_heads, attn.scaling, softcap))
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
