"""Synthetic scenes: a few coloured shapes on a plain background, and what is where (colour / shape / count QA)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
           "black": (20, 20, 20), "orange": (245, 140, 20), "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (200, 215, 235))


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    shapes: tuple[Shape, ...]  # in reading order (top to bottom, left to right)


def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    fill = COLOURS[s.colour]
    r = s.radius
    if s.shape == "circle":
        draw.ellipse((s.cx - r, s.cy - r, s.cx + r, s.cy + r), fill=fill)
    elif s.shape == "square":
        draw.rectangle((s.cx - r * 0.85, s.cy - r * 0.85, s.cx + r * 0.85, s.cy + r * 0.85), fill=fill)
    else:
        pts = [(s.cx + r * math.cos(a), s.cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)


def render_scene(rng: random.Random, *, size: int = 448, count: int | None = None) -> Scene:
    """1-4 shapes (or ``count``) of distinct positions, no overlaps, on one of a few plain backgrounds."""
    count = count or rng.randint(1, 4)
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    shapes: list[Shape] = []
    while len(shapes) < count:
        r = rng.uniform(0.07, 0.14) * size
        cx, cy = rng.uniform(r + 4, size - r - 4), rng.uniform(r + 4, size - r - 4)
        if any(math.hypot(cx - o.cx, cy - o.cy) < r + o.radius + 0.1 * size for o in shapes):
            continue
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), cx, cy, r))
    for s in shapes:
        _draw(draw, s)
    return Scene(image, tuple(sorted(shapes, key=lambda s: (round(s.cy / (0.2 * size)), s.cx))))
