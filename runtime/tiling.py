"""Tiled images, one vision call per tile (manifest.Tiling).

idefics3 (Idefics3 / SmolVLM): tile x tile pieces plus the whole image at tile x tile, written into the prompt by
row and column (equal to Idefics3ImageProcessor and Idefics3Processor).
anyres (LLaVA-NeXT): the whole image squashed to the processor's size, then the tiles of the image fitted into the
best grid resolution; their features are laid out as one grid, cropped back to the image's aspect ratio, with a
newline feature after each row (equal to LlavaNextImageProcessor and LlavaNextModel.pack_image_features)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .errors import ConfigError
from .images import PreparedImage, fit, normalize, resize
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
    kinds = {"idefics3": _prepare_idefics3, "anyres": _prepare_anyres}
    if info.tiling.kind not in kinds:
        raise ConfigError(f"image tiling {info.tiling.kind!r} is not known to this runtime; upgrade safesteer")
    return kinds[info.tiling.kind](img, info)


def _prepare_idefics3(img: Image.Image, info: ImageInfo) -> PreparedImage:
    t = info.tiling
    size, tile = (img.height, img.width), t.tile
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
    return PreparedImage(pixels, idefics3_text(rows, cols, info), size)


def best_grid(height: int, width: int, grid) -> tuple[int, int]:
    """The grid resolution that keeps most of the image's pixels, then wastes least (HF's select_best_resolution)."""
    best, most, least = None, 0, float("inf")
    for h, w in grid:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - kept
        if kept > most or (kept == most and wasted < least):
            best, most, least = (h, w), kept, wasted
    return best


def _fit_inside(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale_w, scale_h = target_w / width, target_h / height  # rounded as HF rounds them (ceil sees 224.00000000000003)
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def _unpadded(rows: int, cols: int, size: tuple[int, int]) -> tuple[slice, slice]:
    """The part of a rows x cols feature grid that covers the image rather than its padding."""
    height, width = size
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return slice(0, rows), slice(pad, cols - pad)


def _prepare_anyres(img: Image.Image, info: ImageInfo) -> PreparedImage:
    tile, size = info.tiling.tile, (img.height, img.width)
    grid_h, grid_w = best_grid(img.height, img.width, info.tiling.grid)
    fit_h, fit_w = _fit_inside(img.height, img.width, grid_h, grid_w)
    fitted = np.asarray(resize(img, fit_h, fit_w, info))
    fitted = fitted[:, :, None] if fitted.ndim == 2 else fitted
    canvas = np.zeros((grid_h, grid_w, fitted.shape[2]), np.uint8)  # centred, zero padding
    top, left = (grid_h - fit_h) // 2, (grid_w - fit_w) // 2
    canvas[top:top + fit_h, left:left + fit_w] = fitted
    squashed = resize(img, *(info.size if len(info.size) == 2 else info.size * 2), info)
    frames = [fit(squashed, info)]
    for r in range(grid_h // tile):
        for c in range(grid_w // tile):
            piece = canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
            frames.append(fit(Image.fromarray(piece.squeeze(-1) if piece.shape[2] == 1 else piece), info))
    side = math.isqrt(info.tokens_per_image)
    rows, cols = _unpadded(grid_h // tile * side, grid_w // tile * side, size)
    count = info.tokens_per_image + (rows.stop - rows.start) * (cols.stop - cols.start + 1)
    pixels = np.stack([normalize(f, info) for f in frames])
    return PreparedImage(pixels, info.image_token * count, size, (grid_h, grid_w))


def anyres_rows(features: np.ndarray, image: PreparedImage, info: ImageInfo, newline: np.ndarray) -> np.ndarray:
    """One anyres image's vision features [1 + tiles, tokens, hidden] -> its image-token rows [count, hidden]: the
    whole image's tokens, then the tiles' features as one grid (row-major over the grid's feature rows), cropped to
    the image's aspect ratio, each row followed by ``newline``."""
    tile, side = info.tiling.tile, math.isqrt(info.tokens_per_image)
    grid_rows, grid_cols = image.grid[0] // tile, image.grid[1] // tile
    hidden = features.shape[-1]
    tiles = features[1:].reshape(grid_rows, grid_cols, side, side, hidden)
    plane = tiles.transpose(0, 2, 1, 3, 4).reshape(grid_rows * side, grid_cols * side, hidden)
    rows, cols = _unpadded(grid_rows * side, grid_cols * side, image.size)
    plane = plane[rows, cols]
    plane = np.concatenate([plane, np.broadcast_to(newline, (plane.shape[0], 1, hidden))], axis=1)
    return np.concatenate([features[0], plane.reshape(-1, hidden)])
