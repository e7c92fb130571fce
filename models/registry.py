"""Architecture name -> family class. Unknown architectures get an error listing the supported ones."""

from __future__ import annotations

from typing import Callable, TypeVar

from safesteer_runtime.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(*architectures: str) -> Callable[[T], T]:
    def add(cls: T) -> T:
        for arch in architectures:
            if arch in _REGISTRY:
                raise RuntimeError(f"architecture {arch} registered twice")
            _REGISTRY[arch] = cls
        cls.architectures = tuple(architectures)
        return cls

    return add


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def family_class(architecture: str) -> type:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported. Supported: {', '.join(supported_architectures())}. "
            "A new family is one small class in models/ registered with @register."
        ) from None


def family_for(model) -> object:
    """The family instance wrapping a loaded Hugging Face model."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return family_class(archs[0])(model)
