"""safesteer_models: one small class per supported Hugging Face architecture (export side, uses torch).

A family says where a checkpoint keeps its decoder layers, embeddings, head and vision tower, how one
decoder layer runs with an external KV cache and a 4-D additive mask, and how its images are
preprocessed. ``family_for`` looks one up by the checkpoint's ``architectures`` entry.
"""

from .registry import family_for, family_class, register, supported_architectures
from . import llama as _llama  # noqa: F401  (registers LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)
from . import phi3 as _phi3  # noqa: F401  (registers Phi3ForCausalLM)
from . import gemma as _gemma  # noqa: F401  (Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration)
from . import idefics3 as _idefics3  # noqa: F401  (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)
from . import qwen_vl as _qwen_vl  # noqa: F401  (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
from . import llava as _llava  # noqa: F401  (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)

__all__ = ["family_for", "family_class", "register", "supported_architectures"]
