"""An HF image processor's settings as the runtime's ImageInfo preprocessing fields (resize, crop, rescale,
normalise), for families whose images are one fixed-size vision call each."""

from __future__ import annotations

from pathlib import Path

_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL enum values


def load_processor(model_dir: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)


def preprocessing_fields(proc, size: dict | None = None) -> dict:
    """``size``: the resize target when the processor's own size is not one (tiled families pass the tile's)."""
    size = dict(size or proc.size)
    if size.get("shortest_edge"):
        resize, dims = "shortest_edge", (int(size["shortest_edge"]),)
    else:
        resize, dims = "exact", (int(size["height"]), int(size["width"]))
    if not proc.do_resize:
        resize = "none"
    crop = None
    if getattr(proc, "do_center_crop", False):
        crop = (int(proc.crop_size["height"]), int(proc.crop_size["width"]))
    return dict(
        resize=resize,
        size=dims,
        resample=_RESAMPLE_NAMES[int(proc.resample)],
        crop=crop,
        rescale_factor=float(proc.rescale_factor) if proc.do_rescale else None,
        mean=tuple(float(x) for x in proc.image_mean) if proc.do_normalize else None,
        std=tuple(float(x) for x in proc.image_std) if proc.do_normalize else None,
        convert_rgb=bool(getattr(proc, "do_convert_rgb", True)),
        pad=_pad_colour(proc),
    )


def _pad_colour(proc) -> tuple[int, int, int] | None:
    """LLaVA's processor with do_pad: the square's colour is the normalisation mean in 0-255 (truncated)."""
    if not getattr(proc, "do_pad", False) or type(proc).__name__ not in ("LlavaImageProcessor", "LlavaImageProcessorPil"):
        return None
    mean = proc.image_mean if proc.image_mean else (0, 0, 0)
    return tuple(int(x * 255) for x in mean)
