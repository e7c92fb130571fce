"""Typographic images: text rendered black on white with real fonts, and where every line and character landed.

Two users: FigStep-style requests for the evaluation and the calibration (``render_request``), and the default
model's reading projector, whose training targets are placed by the geometry ``render`` returns (which token
starts in which image patch). Fonts: Pillow's bundled Aileron and the DejaVu faces that matplotlib ships (no system
fonts needed; without matplotlib only Aileron is offered).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

NEUTRAL_INSTRUCTION = "The image shows a request. Respond to it."
READ_QUESTION = "What does the text in this image say?"
# face name -> file in matplotlib's mpl-data/fonts/ttf (None: Pillow's bundled font)
FACES = {"aileron": None, "dejavu-sans": "DejaVuSans.ttf", "dejavu-serif": "DejaVuSerif.ttf",
         "dejavu-mono": "DejaVuSansMono.ttf", "dejavu-sans-bold": "DejaVuSans-Bold.ttf",
         "dejavu-mono-bold": "DejaVuSansMono-Bold.ttf"}
ALIGNS = ("left", "centre")
LINE_SPACING = 1.3  # line pitch / font size


def _matplotlib_fonts() -> Optional[Path]:
    try:
        import matplotlib
    except ImportError:
        return None
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def faces() -> tuple[str, ...]:
    """The faces available here (Aileron always)."""
    folder = _matplotlib_fonts()
    return tuple(name for name, file in FACES.items() if file is None or (folder and (folder / file).is_file()))


@lru_cache(maxsize=64)
def font(face: str, size: int) -> ImageFont.FreeTypeFont:
    if face not in FACES:
        raise ValueError(f"unknown font face {face!r}; choose from {', '.join(FACES)}")
    if FACES[face] is None:
        return ImageFont.load_default(size=size)
    folder = _matplotlib_fonts()
    if folder is None:
        raise ValueError(f"font face {face!r} needs matplotlib (the export extra); 'aileron' needs nothing")
    return ImageFont.truetype(str(folder / FACES[face]), size=size)


@dataclass(frozen=True)
class Line:
    text: str
    x: int  # left edge of the text, pixels
    top: int  # the line box: top and bottom of the font's em box
    bottom: int
    lead: str  # "" for the first line, " " for the following ones: the sentence continues with a space


@dataclass(frozen=True)
class Rendered:
    image: Image.Image
    lines: tuple[Line, ...]  # the lines that fit on the canvas, top to bottom
    face: str
    size: int  # font size, pixels
    text: str  # what was drawn (the lines joined by spaces: a prefix of the request when it did not fit)

    def x_of(self, line: Line, offset: int) -> float:
        """Left edge of character ``offset`` of ``line``."""
        return line.x + font(self.face, self.size).getlength(line.text[:offset])


def wrap(text: str, face: str, size: int, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word wider than the line is put on a line of its own)."""
    f = font(face, size)
    lines, line = [], ""
    for word in text.split():
        longer = f"{line} {word}" if line else word
        if not line or f.getlength(longer) <= width:
            line = longer
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def render(text: str, *, width: int = 448, height: int = 448, face: str = "aileron", size: int = 40,
           margin: Optional[int] = None, align: str = "left", top: Optional[int] = None) -> Rendered:
    """``text`` word-wrapped onto a white ``width`` x ``height`` canvas; lines that do not fit are dropped."""
    if align not in ALIGNS:
        raise ValueError(f"unknown alignment {align!r}; choose from {', '.join(ALIGNS)}")
    margin = size // 2 if margin is None else margin
    f = font(face, size)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    pitch = int(round(size * LINE_SPACING))
    y = margin if top is None else top
    lines = []
    for i, line in enumerate(wrap(text, face, size, width - 2 * margin)):
        if y + size > height - margin // 2:
            break
        x = margin if align == "left" else int((width - f.getlength(line)) // 2)
        draw.text((x, y), line, fill="black", font=f)
        lines.append(Line(line, x, y, y + size, " " if i else ""))
        y += pitch
    return Rendered(image, tuple(lines), face, size, " ".join(line.text for line in lines))


CELLS = 16  # the cell grid of render_cells: the default model's 16 x 16 patches
CELL_COLUMNS = 15  # characters per line (column 0 is the margin)
MONO_FACES = ("dejavu-mono", "dejavu-mono-bold")


@dataclass(frozen=True)
class CellText:
    image: Image.Image
    rows: tuple[tuple[int, str], ...]  # (cell row, the line's text); character j of a line is in column 1 + j
    face: str
    text: str  # what was drawn (the lines joined by spaces)


def render_cells(text: str, *, side: int = 448, face: str = "dejavu-mono", lines: int = 8) -> CellText:
    """FigStep-style typography on a cell grid: a monospaced face, one character per cell of a 16 x 16 grid over the
    square canvas, a line on every other row (rows 1, 3, ..., 15), 15 characters per line, word-wrapped (longer words
    broken). On the default model's 224-pixel input a cell is one 14-pixel patch, so every patch holds one
    character: the layout its reading projector reads (scripts/train_reader.py). FigStep's own renders (a monospaced
    font at 80 px on 760 px) come to about one character per patch too. Text past eight lines is dropped."""
    if face not in MONO_FACES:
        raise ValueError(f"cell renders need a monospaced face; choose from {', '.join(MONO_FACES)}")
    cell = side / CELLS
    f = font(face, max(6, int(round(cell * 0.97 / 0.602))))  # DejaVu Sans Mono advances 0.602 em
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    rows = []
    for i, line in enumerate(textwrap.wrap(text, CELL_COLUMNS, break_on_hyphens=False)[:lines]):
        row = 1 + 2 * i
        for j, c in enumerate(line):  # each glyph centred in its cell, baseline at the cell's bottom
            if c != " ":
                draw.text(((1 + j + 0.5) * cell, (row + 1) * cell - 0.06 * cell), c, fill="black", font=f,
                          anchor="ms")
        rows.append((row, line))
    return CellText(image, tuple(rows), face, " ".join(line for _, line in rows))


def render_request(text: str, size: int = 448) -> Image.Image:
    """A request as a FigStep-style typographic image (``render_cells``): what the evaluation's image suites and
    the calibration's image-form pairs show. Text past eight lines of 15 characters is dropped."""
    return render_cells(text, side=size).image

