"""Llama-style decoders: LlamaForCausalLM and Qwen2ForCausalLM (Qwen2's q/k/v biases live in its Linears)."""

from __future__ import annotations

from safesteer_runtime.errors import UnsupportedArchitectureError

from .base import Family, TextStack
from .onnx_ops import cached_attention, rms_norm, rotary, skip_rms_norm
from .registry import register


def llama_layer_forward(layer, hidden, mask, rope, past_k, past_v):
    """``rope``: (position_ids [b, s], cos table, sin table), see Family.rope_tables."""
    attn, cfg = layer.self_attn, layer.self_attn.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    x = rms_norm(hidden, layer.input_layernorm)
    q = rotary(attn.q_proj(x), *rope, heads)
    k = rotary(attn.k_proj(x), *rope, kv_heads)  # [b, s, kv_heads * d]: the new cache rows
    x, k, v = cached_attention(q, k, attn.v_proj(x), past_k, past_v, mask, heads, kv_heads, attn.scaling)
    x, hidden = skip_rms_norm(attn.o_proj(x), hidden, layer.post_attention_layernorm)
    hidden = hidden + layer.mlp(x)
    return hidden, k, v


def attention_window(cfg) -> tuple[int | None, frozenset[int]]:
    """(the sliding window, the layers that use it); (None, {}) when every layer attends fully. Sliding layers
    read the blocks' sliding_attention_mask, which the runtime builds from the full mask (masks.windowed)."""
    kinds = list(getattr(cfg, "layer_types", None) or [])
    if set(kinds) - {"full_attention", "sliding_attention"}:
        raise UnsupportedArchitectureError(f"{cfg.model_type} layer kinds {sorted(set(kinds))} are not supported yet")
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None, frozenset()
    layers = [i for i, k in enumerate(kinds) if k == "sliding_attention"] if kinds else range(cfg.num_hidden_layers)
    return (int(window), frozenset(layers)) if layers else (None, frozenset())


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
        self.window, self.sliding_layers = attention_window(self.text.config)

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
    """Llama layers; Mistral 7B v0.1 slides a 4096-token window over every layer, v0.2+ attend fully."""

    name = "mistral"
    model_type = "mistral"
    config_class = "MistralConfig"
    tiny = dict(num_key_value_heads=2, tie_word_embeddings=False, head_dim=24, sliding_window=None)

    @classmethod
    def tiny_configs(cls, vocab_size: int) -> dict[str, object]:
        # head_dim 24 with hidden 64 / 4 heads: Mistral's head_dim is its own setting; an 8-token window is passed
        # within the parity tests' prompts
        return {"gqa": cls.text_config(vocab_size), "window": cls.text_config(vocab_size, sliding_window=8)}


# Text families a multimodal wrapper (LLaVA) can hold, by the text config's model_type.
TEXT_FAMILIES = {cls.model_type: cls for cls in (LlamaFamily, Qwen2Family)}


class WithLlamaText(Family):
    """A multimodal checkpoint whose language model is one of TEXT_FAMILIES (LLaVA, Idefics3)."""

    def __init__(self, model):
        text_type = model.config.text_config.model_type
        if text_type not in TEXT_FAMILIES:
            raise UnsupportedArchitectureError(f"{self.architectures[0]} with a {text_type!r} language model is not "
                                               f"supported; supported: {sorted(TEXT_FAMILIES)}")
        self._text_family = TEXT_FAMILIES[text_type]
        super().__init__(model)
        self.window, self.sliding_layers = attention_window(self.text.config)

    def layer_forward(self, layer, hidden, mask, rope, past_k, past_v):
        return self._text_family.layer_forward(layer, hidden, mask, rope, past_k, past_v)
