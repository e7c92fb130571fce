"""safesteer_rt: the public runtime API. Needs onnxruntime, numpy, tokenizers, pillow, jinja2; never torch.

    from safesteer_rt import Generator
    gen = Generator("artifacts/default")
    print(gen.generate([{"role": "user", "content": "Hello!"}], max_new_tokens=32).text)
"""

from safesteer_runtime.batch import Batch, BatchRequest
from safesteer_runtime.errors import (ArtifactError, BusyError, ConfigError, ImageError, InputError,
                                      PromptTooLongError, SafeSteerError)
from safesteer_runtime.generator import GenerationResult, Generator, Timings
from safesteer_runtime.images import ImageLimits
from safesteer_runtime.manifest import Manifest, load_manifest
from safesteer_runtime.safety import SafetyConfig
from safesteer_runtime.sampling import SamplingConfig
from safesteer_runtime.sessions import resolve_providers

__all__ = [
    "Generator", "Batch", "BatchRequest", "GenerationResult", "Timings", "SamplingConfig", "SafetyConfig", "Manifest", "load_manifest", "resolve_providers",
    "SafeSteerError", "ArtifactError", "InputError", "PromptTooLongError", "ImageError", "ConfigError",
    "BusyError", "ImageLimits",
]
