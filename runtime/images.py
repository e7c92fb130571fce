"""Image loading and preprocessing in numpy/Pillow, equal to the model's Hugging Face image processor."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError
from .manifest import ImageInfo

ImageLike = Union[Image.Image, str, Path, bytes]
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def load_image(image: ImageLike) -> Image.Image:
    """A decoded PIL image, or an ImageError that says what is wrong with the input."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file {path} does not exist")
        if path.stat().st_size == 0:
            raise ImageError(f"image file {path} is empty (0 bytes)")
        source, label = path, str(path)
    elif isinstance(image, (bytes, bytearray)):
        if not image:
            raise ImageError("image bytes are empty")
        source, label = io.BytesIO(image), "image bytes"
    else:
        raise ImageError(f"an image must be a PIL.Image, a file path or bytes, not {type(image).__name__}")
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label} is not a readable image ({exc}); pass a PNG/JPEG/WebP file") from None


def _resize_shape(height: int, width: int, info: ImageInfo) -> tuple[int, int]:
    if info.resize == "exact":
        return info.size[0], info.size[1]
    short_target = info.size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_target * long / short)
    return (new_long, short_target) if width <= height else (short_target, new_long)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    if crop_h > h or crop_w > w:  # pad with zeros, centred, as HF does
        padded = np.zeros((max(h, crop_h), max(w, crop_w), pixels.shape[2]), pixels.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top : top + h, left : left + w] = pixels
        pixels, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return pixels[top : top + crop_h, left : left + crop_w]


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what HF's processors do)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(image: ImageLike, info: ImageInfo) -> Image.Image:
    """A non-empty PIL image, in RGB when the processor converts."""
    img = load_image(image)
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image has zero size ({img.width}x{img.height})")
    return to_rgb(img) if info.convert_rgb else img


def resize(img: Image.Image, height: int, width: int, info: ImageInfo) -> Image.Image:
    return img.resize((width, height), resample=_RESAMPLE[info.resample])


def normalize(pixels: np.ndarray, info: ImageInfo) -> np.ndarray:
    """uint8 [H, W(, C)] -> rescaled, normalised float32 [C, H, W]."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    out = pixels.astype(np.float32)
    if info.rescale_factor is not None:
        out = (pixels.astype(np.float64) * info.rescale_factor).astype(np.float32)
    if info.mean is not None:
        out = (out - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def fit(img: Image.Image, info: ImageInfo) -> np.ndarray:
    """The processor's resize and center crop: uint8 [H, W, C]."""
    if info.resize != "none":
        img = resize(img, *_resize_shape(img.height, img.width, info), info)
    pixels = np.asarray(img)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return _center_crop(pixels, *info.crop) if info.crop is not None else pixels


def preprocess(image: ImageLike, info: ImageInfo) -> np.ndarray:
    """One vision call's pixel values [3, H, W] float32 (images that are not tiled)."""
    return normalize(fit(decode(image, info), info), info)


@dataclass
class PreparedImage:
    pixels: np.ndarray  # [vision calls, 3, H, W]: the image, or its tiles
    text: str  # what the image's placeholder becomes in the prompt
    size: tuple[int, int]  # the image's own (height, width)
    grid: Optional[tuple[int, ...]] = None  # anyres: the (height, width) its tiles cover; patching: (t, rows, cols)


def prepare(image: ImageLike, info: ImageInfo) -> PreparedImage:
    img = decode(image, info)
    if info.patching is not None:
        from .qwen_vl import prepare_patched

        return prepare_patched(img, info)
    if info.tiling is not None:
        from .tiling import prepare_tiled

        return prepare_tiled(img, info)
    return PreparedImage(normalize(fit(img, info), info)[None], info.expansion(), (img.height, img.width))
