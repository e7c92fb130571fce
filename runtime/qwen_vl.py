"""Patch-based images and multimodal RoPE (Qwen2-VL, Qwen2.5-VL), in numpy.

Equal to Qwen2VLImageProcessor (smart resize, patches ordered merge block by merge block), to the vision model's
patch positions and Qwen2.5-VL's window order, and to Qwen2VLModel.get_rope_index: text tokens count up on all three
rows (temporal, height, width); an image's tokens sit at (t, row, column) of its merged grid after the text before
it, and the text after it continues from the largest position used + 1.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from . import manifest as m
from .errors import ImageError
from .images import PreparedImage, normalize, resize
from .manifest import ImageInfo, Patching


def smart_size(height: int, width: int, p: Patching) -> tuple[int, int]:
    """Both sides multiples of patch * merge, the area within [min_pixels, max_pixels], the aspect ratio kept."""
    factor = p.patch * p.merge
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"an image of {width}x{height} is too elongated for this model (aspect ratio over 200); "
                         "crop or pad it first")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > p.max_pixels:
        beta = math.sqrt(height * width / p.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < p.min_pixels:
        beta = math.sqrt(p.min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def prepare_patched(img: Image.Image, info: ImageInfo) -> PreparedImage:
    p = info.patching
    height, width = smart_size(img.height, img.width, p)
    pixels = normalize(np.asarray(resize(img, height, width, info)), info)  # [C, H, W]
    channels, rows, cols = pixels.shape[0], height // p.patch, width // p.patch
    blocks = pixels.reshape(channels, rows // p.merge, p.merge, p.patch, cols // p.merge, p.merge, p.patch)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]  # a still image: every temporal frame equal
    blocks = np.broadcast_to(blocks, (*blocks.shape[:5], p.temporal, p.patch, p.patch))
    patches = np.ascontiguousarray(blocks.reshape(rows * cols, -1), dtype=np.float32)
    tokens = rows * cols // (p.merge * p.merge)
    text = info.prefix + info.image_token * tokens + info.suffix
    return PreparedImage(patches, text, (img.height, img.width), (1, rows, cols))


def _patch_positions(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(row, column) of each patch [t * h * w, 2], merge blocks in order, row-major inside each."""
    t, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows, cols = (a.reshape(shape).transpose(0, 2, 1, 3).ravel() for a in (rows, cols))
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


def _window_order(grid: tuple[int, int, int], p: Patching) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL: the image's merged tokens in window order, and the window sizes (in merged tokens)."""
    t, h, w = grid
    side = p.window // p.merge // p.patch  # merged tokens per window side
    lh, lw = h // p.merge, w // p.merge
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = side - lh % side, side - lw % side
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
    nh, nw = (lh + pad_h) // side, (lw + pad_w) // side
    windows = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
    sizes = [int(n) for n in (windows >= 0).sum(axis=1) if n]
    return windows[windows >= 0], sizes


def _block_mask(sizes: Sequence[int], n: int) -> np.ndarray:
    mask = np.full((1, 1, n, n), np.finfo(np.float32).min, np.float32)
    start = 0
    for size in sizes:
        mask[0, 0, start:start + size, start:start + size] = 0.0
        start += size
    return mask


def vision_feeds(images: Sequence[PreparedImage], info: ImageInfo) -> tuple[dict[str, np.ndarray], Optional[np.ndarray]]:
    """(the vision graph's inputs over every image's patches, the permutation that puts its merged outputs back in
    prompt order — Qwen2.5-VL feeds patches in window order — or None)."""
    p = info.patching
    unit = p.merge * p.merge
    pixels = np.concatenate([im.pixels for im in images])
    positions = np.concatenate([_patch_positions(im.grid, p.merge) for im in images])
    per_image = [im.pixels.shape[0] for im in images]
    feeds = {m.VISION_POSITIONS: positions.astype(np.int64), m.VISION_MASK: _block_mask(per_image, len(pixels))}
    if p.window is None:
        return {m.PIXEL_VALUES: pixels, **feeds}, None
    order, windows, offset = [], [], 0
    for im in images:
        index, sizes = _window_order(im.grid, p)
        order.append(index + offset)
        windows += [s * unit for s in sizes]
        offset += im.pixels.shape[0] // unit
    order = np.concatenate(order)

    def by_window(x):
        return np.ascontiguousarray(x.reshape(-1, unit, x.shape[-1])[order].reshape(x.shape))

    feeds = {m.PIXEL_VALUES: by_window(pixels), m.VISION_POSITIONS: by_window(feeds[m.VISION_POSITIONS]),
             m.VISION_MASK: feeds[m.VISION_MASK], m.VISION_WINDOW_MASK: _block_mask(windows, len(pixels))}
    return feeds, np.argsort(order)


def mrope_positions(ids: np.ndarray, images: Sequence[PreparedImage], info: ImageInfo,
                   runs: Sequence[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """(position ids [3, 1, n] of a prompt whose image-token ``runs`` hold ``images`` in order, the offset later
    positions get: max position + 1 - n)."""
    merge = info.patching.merge
    pieces, cur, last = [], 0, 0
    for (start, end), image in zip(runs, images):
        pieces.append(np.broadcast_to(np.arange(start - last) + cur, (3, start - last)))
        cur += start - last
        t, h, w = image.grid
        grid = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
        pieces.append(np.stack([g.ravel() for g in grid]) + cur)
        cur += max(h, w) // merge
        last = end
    pieces.append(np.broadcast_to(np.arange(len(ids) - last) + cur, (3, len(ids) - last)))
    positions = np.concatenate(pieces, axis=1).astype(np.int64)[:, None, :]
    return np.ascontiguousarray(positions), int(positions.max()) + 1 - len(ids)
