"""How a chart is drawn: a 224 px square of 8 x 8 cells of 28 px, one per visual token.

Why it looks like this (the demo models' lessons, recorded in their cards under
``dreamr_stream/zoo/weights``): their vision sees 14 px patches merged 2x2, one visual token per
28 px cell, read at the patch embedding, so a token knows its own cell and nothing else. The grid
task's 112 px (16 tokens) holds a 4x4 grid; a bar chart with up to six bars, a value axis and the
bars' letters needs 8 x 8 cells, so the charts are 224 px and their models 64 visual tokens.
Everything a step needs is then inside one cell:

* each bar's value is printed above its top (or right of its end, for horizontal bars) in
  digits 14 px tall, centred in the first cell the bar does not reach: reading a value is
  classifying one token, not measuring a bar against a far-away axis;
* each bar's letter sits in its own cell at the foot of the bar (vertical) or left of it
  (horizontal), 21 px tall: finding bar C is finding the token that shows a C, and its value
  is in the same column (row);
* the value axis is six cells long with a labelled gridline at each cell boundary and a fainter
  one between, so the bars' lengths agree with the printed values for a reader who looks; the
  tick labels are small and sit in the axis's own cells, never in a value's or a letter's cell;
* no cell holds both a bar and text, and no cell holds two texts (``cell_classes``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from dreamr_stream.tasks.charts.chart import AXIS_CELLS, LETTERS, MAX_VALUE, PALETTE, Chart
from dreamr_stream.tasks.charts.glyphs import draw_text, text_size

__all__ = [
    "AXIS",
    "BASE",
    "CELL",
    "CELL_CLASSES",
    "GRID",
    "IMAGE_SIZE",
    "BarBox",
    "bar_boxes",
    "cell_classes",
    "render",
]

CELL = 28
GRID = 8
IMAGE_SIZE = GRID * CELL
AXIS = CELL  # the category axis runs along x = 28 (horizontal bars start there)
BASE = (GRID - 1) * CELL  # the zero line of vertical bars: y = 196, the letters' row below it
_SPAN = AXIS_CELLS * CELL  # pixels from zero to the axis's top value

# a cell's class: nothing a step reads (background, gridlines, axes, tick labels), a bar, a
# bar's letter, or a printed value
CLASS_OTHER, CLASS_BAR, _FIRST_LETTER = 0, 1, 2
_FIRST_VALUE = _FIRST_LETTER + len(LETTERS)  # value v is class _FIRST_VALUE + v - 1
CELL_CLASSES = _FIRST_VALUE + MAX_VALUE

_BACKGROUND = (250, 250, 250)
_INK = (25, 25, 25)
_AXIS_INK = (70, 70, 70)
_MAJOR_GRID = (205, 205, 205)
_MINOR_GRID = (230, 230, 230)
_VALUE_SCALE, _LETTER_SCALE, _TICK_SCALE = 2, 3, 1


@dataclass(frozen=True)
class BarBox:
    """Where one bar is drawn: ``box`` in pixels (x0, y0, x1, y1, ends exclusive; the bar starts
    beside its axis line), and the cells (row, column) of its printed value and of its letter."""

    box: tuple[int, int, int, int]
    value_cell: tuple[int, int]
    letter_cell: tuple[int, int]


def _length(value: int, axis_max: int) -> int:
    return max(1, round(value * _SPAN / axis_max))


def bar_boxes(chart: Chart) -> list[BarBox]:
    """Each bar's place, in reading order."""
    boxes = []
    w = chart.bar_width
    for i, value in enumerate(chart.values):
        slot = chart.first_slot + i
        length = _length(value, chart.axis_max)
        if chart.horizontal:  # slots are rows 0..6, letters in column 0, the value right of the end
            y0 = slot * CELL + (CELL - w) // 2
            end = AXIS + length
            boxes.append(BarBox((AXIS + 1, y0, end, y0 + w), (slot, -(-end // CELL)), (slot, 0)))
        else:  # slots are columns 1..7, letters in row 7, the value above the top
            col = slot + 1
            x0 = col * CELL + (CELL - w) // 2
            top = BASE - length
            boxes.append(BarBox((x0, top, x0 + w, BASE), (top // CELL - 1, col), (GRID - 1, col)))
    return boxes


def cell_classes(chart: Chart) -> list[int]:
    """Each cell's class (``CELL_CLASSES`` of them), row by row: for the per-cell perception loss."""
    cells = [[CLASS_OTHER] * GRID for _ in range(GRID)]
    for bar, label, value in zip(bar_boxes(chart), chart.labels, chart.values, strict=True):
        x0, y0, x1, y1 = bar.box
        for r in range(y0 // CELL, (y1 - 1) // CELL + 1):
            for c in range(x0 // CELL, (x1 - 1) // CELL + 1):
                cells[r][c] = CLASS_BAR
        cells[bar.value_cell[0]][bar.value_cell[1]] = _FIRST_VALUE + value - 1
        cells[bar.letter_cell[0]][bar.letter_cell[1]] = _FIRST_LETTER + LETTERS.index(label)
    return [c for row in cells for c in row]


def _centred(draw: ImageDraw.ImageDraw, cell: tuple[int, int], text: str, scale: int, rng: random.Random) -> None:
    """``text`` in the middle of ``cell`` (row, column), moved by at most a pixel each way."""
    w, h = text_size(text, scale)
    x = cell[1] * CELL + (CELL - w) // 2 + rng.randint(-1, 1)
    y = cell[0] * CELL + (CELL - h) // 2 + rng.randint(-1, 1)
    draw_text(draw, (x, y), text, scale, _INK)


def _axes(draw: ImageDraw.ImageDraw, chart: Chart) -> None:
    """Gridlines every half cell of the value axis, the two axes, and the tick labels."""
    half = CELL // 2
    for j in range(1, 2 * AXIS_CELLS + 1):
        colour = _MAJOR_GRID if j % 2 == 0 else _MINOR_GRID
        if chart.horizontal:
            x = AXIS + j * half
            draw.line((x, 0, x, BASE - 1), fill=colour)
        else:
            y = BASE - j * half
            draw.line((AXIS + 1, y, IMAGE_SIZE - 1, y), fill=colour)
    if chart.horizontal:
        draw.line((AXIS, 0, AXIS, BASE), fill=_AXIS_INK, width=1)
        draw.line((AXIS, BASE, AXIS + _SPAN + 4, BASE), fill=_AXIS_INK, width=1)
    else:
        draw.line((AXIS, BASE - _SPAN - 4, AXIS, BASE), fill=_AXIS_INK, width=1)
        draw.line((AXIS, BASE, IMAGE_SIZE - 1, BASE), fill=_AXIS_INK, width=1)
    for j in range(AXIS_CELLS + 1):
        text = str(j * chart.tick)
        w, h = text_size(text, _TICK_SCALE)
        if chart.horizontal:  # below the axis, centred on the gridline
            x = AXIS + j * CELL
            draw.line((x, BASE, x, BASE + 2), fill=_AXIS_INK)
            draw_text(draw, (x - w // 2, BASE + 5), text, _TICK_SCALE, _AXIS_INK)
        else:  # left of the axis, right-aligned, centred on the gridline
            y = BASE - j * CELL
            draw.line((AXIS - 2, y, AXIS, y), fill=_AXIS_INK)
            draw_text(draw, (AXIS - 4 - w, y - h // 2), text, _TICK_SCALE, _AXIS_INK)


def render(chart: Chart) -> Image.Image:
    """Draw ``chart``: 224 x 224 RGB, near-white background (``render``'s module docstring)."""
    rng = random.Random(chart.jitter_seed)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    _axes(draw, chart)
    for bar, label, value, name in zip(bar_boxes(chart), chart.labels, chart.values, chart.colours, strict=True):
        colour = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in PALETTE[name])
        x0, y0, x1, y1 = bar.box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        _centred(draw, bar.value_cell, str(value), _VALUE_SCALE, rng)
        _centred(draw, bar.letter_cell, label, _LETTER_SCALE, rng)
    return img
