"""Where images sit in a prompt: each placeholder becomes the model's image tokens (the slots the vision features
fill) with the family's text around them, and which positions of a prompt belong to which image."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from . import manifest as m
from .images import ImageLike, PreparedImage, prepare
from .manifest import ImageInfo
from .tiling import anyres_rows


def _already_expanded(count: int, expansions: Sequence[str], info: ImageInfo) -> bool:
    """A processor's output (every image's tokens written out) rather than one placeholder per image."""
    total = sum(e.count(info.image_token) for e in expansions)
    return bool(expansions) and count == total and (total > len(expansions) or info.marker is not None)


def _check_count(found: int, num_images: int, info: ImageInfo) -> None:
    if found != num_images:
        raise InputError(
            f"the prompt has {found} image placeholder(s) ({info.placeholder!r}) but {num_images} image(s) were "
            "given; use one placeholder per image"
        )


def expand_text(text: str, info: ImageInfo, expansions: Sequence[str]) -> str:
    """The i-th placeholder -> ``expansions[i]`` (what images.prepare says image i becomes), before tokenizing, as
    the HF processors do (text around the image tokens tokenizes together with its neighbours)."""
    if _already_expanded(text.count(info.image_token), expansions, info):
        return text
    _check_count(text.count(info.placeholder), len(expansions), info)
    pieces = text.split(info.placeholder)
    return pieces[0] + "".join(e + rest for e, rest in zip(expansions, pieces[1:]))


def expand_ids(ids: list[int], info: ImageInfo, expansions: Sequence[str]) -> list[int]:
    """prompt_ids given directly: the i-th image token id -> as many copies as image i needs, where that is all the
    expansion does (the marker, if any, is prefix + one image token + suffix, and the ids already hold the prefix
    and suffix tokens); ids already expanded pass through."""
    if _already_expanded(sum(1 for i in ids if i == info.image_token_id), expansions, info):
        return ids
    counts = [e.count(info.image_token) for e in expansions]
    wrap = info.prefix, info.suffix
    only_tokens = info.marker in (None, wrap[0] + info.image_token + wrap[1])
    if not only_tokens or any(e != wrap[0] + info.image_token * n + wrap[1] for e, n in zip(expansions, counts)):
        raise InputError(
            "this model writes text around each image's tokens; pass prompt= or messages= (or prompt_ids with every "
            "image's tokens already written out, as its processor makes them)"
        )
    _check_count(sum(1 for i in ids if i == info.image_token_id), len(expansions), info)
    out: list[int] = []
    per_image = iter(counts)
    for i in ids:
        out.extend([i] * next(per_image) if i == info.image_token_id else [i])
    return out


def with_images(text: str, images: Sequence[ImageLike], info: ImageInfo) -> tuple[str, list[PreparedImage]]:
    """(the prompt with every image's tokens written out, the prepared images in prompt order)."""
    prepared = [prepare(image, info) for image in images]
    return expand_text(text, info, [p.text for p in prepared]), prepared


def all_pixels(images: Sequence[PreparedImage]) -> np.ndarray:
    """Every vision call (or patch) of the request, in prompt order."""
    return np.concatenate([p.pixels for p in images])


def vision_inputs(images: Sequence[PreparedImage], info: ImageInfo) -> tuple[dict[str, np.ndarray], Optional[np.ndarray]]:
    """(the vision graph's feeds, the permutation that puts its output rows in prompt order, or None)."""
    if info.patching is not None:
        from .qwen_vl import vision_feeds

        return vision_feeds(images, info)
    return {m.PIXEL_VALUES: all_pixels(images)}, None


def image_rows(images: Sequence[PreparedImage], vision: dict[str, np.ndarray], info: ImageInfo,
               order: Optional[np.ndarray] = None) -> np.ndarray:
    """The vision graph's outputs over vision_inputs(images) -> the rows of every image token, in prompt order."""
    features = vision[m.IMAGE_FEATURES]
    if order is not None:
        features = features[order]
    if info.tiling is None or info.tiling.kind != "anyres":
        return features.reshape(-1, features.shape[-1])
    rows, start = [], 0
    for image in images:
        calls = image.pixels.shape[0]
        rows.append(anyres_rows(features[start:start + calls], image, info, vision[m.IMAGE_NEWLINE]))
        start += calls
    return np.concatenate(rows)


def image_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive image tokens in ``ids`` [n] (one run per image)."""
    flags = np.concatenate([[False], ids == image_token_id, [False]])
    edges = np.flatnonzero(flags[1:] != flags[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
