"""Tiled images: Idefics3 / SmolVLM cut an image into tile x tile pieces plus the whole image at tile x tile, one
vision call each, and write the pieces into the prompt by row and column (equal to Idefics3ImageProcessor and
Idefics3Processor)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .errors import ConfigError
from .images import PreparedImage, normalize, resize
from .manifest import ImageInfo

MAX_SIDE = 4096  # Idefics3's cap on either side after the first resize
FAKE_TOKEN, GLOBAL_TAG = "<fake_token_around_image>", "<global-img>"


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The longest edge -> ``longest``, the other scaled (rounded down, then up to even), then both capped."""
    ratio = width / height
    if width >= height:
        width, height = longest, int(longest / ratio)
        height += height % 2
    else:
        height, width = longest, int(longest * ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    ratio = width / height
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, max(int(MAX_SIDE / ratio), 1)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, max(int(MAX_SIDE * ratio), 1)
    return height, width


def _tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * ratio) / tile) * tile
    return height, width


def idefics3_text(rows: int, cols: int, info: ImageInfo) -> str:
    tokens = info.image_token * info.tokens_per_image
    whole = f"{FAKE_TOKEN}{GLOBAL_TAG}{tokens}{FAKE_TOKEN}"
    if rows == 0:
        return whole
    grid = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return grid + "\n" + whole


def prepare_tiled(img: Image.Image, info: ImageInfo) -> PreparedImage:
    t = info.tiling
    if t.kind != "idefics3":
        raise ConfigError(f"image tiling {t.kind!r} is not known to this runtime; upgrade safesteer")
    tile = t.tile
    if t.longest_edge is not None:
        img = resize(img, *_longest_edge_size(img.height, img.width, t.longest_edge), info)
    rows = cols = 0
    if not t.split:
        frames = [resize(img, tile, tile, info)]
    else:
        img = resize(img, *_tile_multiple_size(img.height, img.width, tile), info)
        frames = [img]
        if img.height > tile or img.width > tile:
            rows, cols = img.height // tile, img.width // tile
            whole = np.asarray(img)
            frames = [whole[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
            frames.append(resize(img, tile, tile, info))
    pixels = np.stack([normalize(np.asarray(f), info) for f in frames])
    return PreparedImage(pixels, idefics3_text(rows, cols, info))
