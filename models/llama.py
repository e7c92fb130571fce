"""Llama-style decoders: LlamaForCausalLM and Qwen2ForCausalLM (Qwen2's q/k/v biases live in its Linears)."""

from __future__ import annotations

import torch

from .base import Family, TextStack
from .registry import register


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention(q, keys, values, mask, scaling: float):
    """Grouped-query attention without materialising repeated K/V.

    q [b, s, heads, d]; keys/values [b, t, kv_heads, d]; mask [b, 1, s, t] additive. Returns [b, s, heads*d].
    """
    b, s, heads, d = q.shape
    kv_heads = keys.shape[2]
    groups = heads // kv_heads
    q = q.transpose(1, 2).reshape(b, kv_heads, groups * s, d)  # head h uses kv head h // groups
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * scaling  # [b, kvh, groups*s, t]
    scores = scores.view(b, kv_heads, groups, s, -1) + mask.unsqueeze(1)
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype).view(b, kv_heads, groups * s, -1)
    out = torch.matmul(probs, values.transpose(1, 2))  # [b, kvh, groups*s, d]
    return out.view(b, heads, s, d).transpose(1, 2).reshape(b, s, heads * d)


def llama_layer_forward(layer, hidden, mask, cos, sin, past_k, past_v):
    attn = layer.self_attn
    b, s, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(b, s, -1, attn.head_dim)
    k = attn.k_proj(x).view(b, s, -1, attn.head_dim)
    v = attn.v_proj(x).view(b, s, -1, attn.head_dim)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    keys = torch.cat((past_k, k), dim=1)
    values = torch.cat((past_v, v), dim=1)
    hidden = hidden + attn.o_proj(attention(q, keys, values, mask, attn.scaling))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k, v


def check_full_attention(cfg) -> None:
    """Sliding-window layers need a windowed mask the runtime does not build yet: refuse, don't mis-export."""
    from safesteer_runtime.errors import UnsupportedArchitectureError

    kinds = set(getattr(cfg, "layer_types", None) or [])
    if getattr(cfg, "use_sliding_window", False) or kinds - {"full_attention"}:
        raise UnsupportedArchitectureError(
            f"{cfg.model_type} checkpoints with sliding-window attention layers are not supported yet "
            "(layer_types / use_sliding_window in config.json)"
        )


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
        check_full_attention(self.text.config)

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


# Text families a multimodal wrapper (LLaVA) can hold, by the text config's model_type.
TEXT_FAMILIES = {cls.model_type: cls for cls in (LlamaFamily, Qwen2Family)}
