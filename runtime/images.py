"""Image loading and preprocessing in numpy/Pillow, equal to the model's Hugging Face image processor."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, ImageError
from .manifest import ImageInfo

ImageLike = Union[Image.Image, str, Path, bytes]


@dataclass(frozen=True)
class ImageLimits:
    """What a request's images may be, checked from each file's header before any pixel is decoded.

    The defaults admit any ordinary photo or screenshot; they refuse inputs built to exhaust memory (a 1 KB PNG of
    400000 x 1 pixels became a 4 GB resize) and, with ``allow_paths=False`` (servers), file paths on this machine.
    """

    max_pixels: int = 40_000_000  # width * height (an RGB decode of 120 MB)
    max_aspect: float = 50.0  # long side / short side
    max_images: int = 16  # per request
    allow_paths: bool = True  # str / Path images are files on this machine; False: PIL images or bytes only

    def __post_init__(self):
        for name, lo in (("max_pixels", 1), ("max_images", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"image limit {name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.max_aspect, (int, float)) or not self.max_aspect >= 1:
            raise ConfigError(f"image limit max_aspect must be a number >= 1, got {self.max_aspect!r}")
        if not isinstance(self.allow_paths, bool):
            raise ConfigError(f"image limit allow_paths must be True or False, got {self.allow_paths!r}")

    def check_size(self, width: int, height: int, label: str) -> None:
        if width == 0 or height == 0:
            raise ImageError(f"{label} has zero size ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageError(f"{label} is {width}x{height} = {width * height} pixels, more than the limit of "
                             f"{self.max_pixels}; scale it down (or raise ImageLimits.max_pixels)")
        if max(width, height) / min(width, height) > self.max_aspect:
            raise ImageError(f"{label} is {width}x{height}, an aspect ratio over the limit of {self.max_aspect:g}; "
                             "crop it (or raise ImageLimits.max_aspect)")


DEFAULT_LIMITS = ImageLimits()
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def load_image(image: ImageLike, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """A decoded PIL image within ``limits``, or an ImageError that says what is wrong with the input."""
    if isinstance(image, Image.Image):
        limits.check_size(image.width, image.height, "the image")
        return image
    if isinstance(image, (str, Path)):
        if not limits.allow_paths:  # one message whether or not the file exists: nothing to learn about the host
            raise ImageError("image file paths are not accepted here; send the image itself (bytes or base64 data)")
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower and checked
            with Image.open(source) as img:
                limits.check_size(img.width, img.height, label)  # from the header, before decoding
                img.load()
                return img.copy()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label} is too large to decode ({exc}); scale it down") from None
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


def decode(image: ImageLike, info: ImageInfo, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """A non-empty PIL image within ``limits``, in RGB when the processor converts."""
    img = load_image(image, limits)
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


def pad_to_square(img: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """``img`` centred on a square of ``colour`` as wide as its long side (HF's pad_to_square)."""
    if img.width == img.height:
        return img
    side = max(img.width, img.height)
    fill = colour if len(img.getbands()) == 3 else colour[0]
    square = Image.new(img.mode, (side, side), fill)
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return square


def fit(img: Image.Image, info: ImageInfo) -> np.ndarray:
    """The processor's padding, resize and center crop: uint8 [H, W, C]."""
    if info.pad is not None:
        img = pad_to_square(img, info.pad)
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


def prepare(image: ImageLike, info: ImageInfo, limits: ImageLimits = DEFAULT_LIMITS) -> PreparedImage:
    img = decode(image, info, limits)
    if info.patching is not None:
        from .qwen_vl import prepare_patched

        return prepare_patched(img, info)
    if info.tiling is not None:
        from .tiling import prepare_tiled

        return prepare_tiled(img, info)
    return PreparedImage(normalize(fit(img, info), info)[None], info.expansion(), (img.height, img.width))
