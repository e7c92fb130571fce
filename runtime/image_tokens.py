"""Where images sit in a prompt: each placeholder becomes the model's run of image tokens (the slots the vision
features fill), and which positions of a prompt belong to which image."""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .manifest import ImageInfo


def _already_expanded(count: int, num_images: int, info: ImageInfo) -> bool:
    """A processor's output (every image's tokens written out) rather than one placeholder per image."""
    return num_images > 0 and count == num_images * info.tokens_per_image and (
        info.tokens_per_image > 1 or info.marker is not None)


def _check_count(found: int, num_images: int, info: ImageInfo) -> None:
    if found != num_images:
        raise InputError(
            f"the prompt has {found} image placeholder(s) ({info.placeholder!r}) but {num_images} image(s) were "
            "given; use one placeholder per image"
        )


def expand_text(text: str, info: ImageInfo, num_images: int) -> str:
    """Each placeholder -> prefix + image tokens + suffix, before tokenizing (as the HF processors do: the prefix and
    suffix text tokenizes together with its neighbours)."""
    if _already_expanded(text.count(info.image_token), num_images, info):
        return text
    _check_count(text.count(info.placeholder), num_images, info)
    return text.replace(info.placeholder, info.expansion()) if num_images else text


def expand_ids(ids: list[int], info: ImageInfo, num_images: int) -> list[int]:
    """prompt_ids given directly: each image token id -> tokens_per_image copies (models without prefix/suffix text);
    ids already expanded pass through."""
    if _already_expanded(sum(1 for i in ids if i == info.image_token_id), num_images, info):
        return ids
    if info.marker is not None or info.prefix or info.suffix:
        raise InputError(
            f"this model wraps each image in text ({info.prefix!r} ... {info.suffix!r}); pass prompt= or messages= "
            "(or prompt_ids with every image's tokens already written out, as its processor makes them)"
        )
    _check_count(sum(1 for i in ids if i == info.image_token_id), num_images, info)
    out: list[int] = []
    for i in ids:
        out.extend([i] * info.tokens_per_image if i == info.image_token_id else [i])
    return out


def image_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive image tokens in ``ids`` [n] (one run per image)."""
    flags = np.concatenate([[False], ids == image_token_id, [False]])
    edges = np.flatnonzero(flags[1:] != flags[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
