"""A 5x7 bitmap font for the charts' digits and bar letters, drawn as blocks of pixels.

A bitmap of our own, not a TrueType font: the same item draws the same pixels whatever Pillow,
FreeType or fonts a machine has, and the glyphs scale by whole pixels, so a value's digits are
crisp blocks that one visual token of the demo models can tell apart.
"""

from __future__ import annotations

from PIL import ImageDraw

__all__ = ["GLYPH_HEIGHT", "GLYPH_WIDTH", "draw_text", "text_size"]

GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7

_ROWS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
}
# each glyph's lit pixels as (x, y), precomputed
_PIXELS: dict[str, tuple[tuple[int, int], ...]] = {
    ch: tuple((x, y) for y, row in enumerate(rows) for x, c in enumerate(row) if c == "#") for ch, rows in _ROWS.items()
}


def text_size(text: str, scale: int) -> tuple[int, int]:
    """Width and height in pixels of ``text`` at ``scale`` (one blank glyph column between glyphs)."""
    return (len(text) * (GLYPH_WIDTH + 1) - 1) * scale, GLYPH_HEIGHT * scale


def draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, scale: int, fill: tuple[int, int, int]
) -> None:
    """Draw ``text`` (digits and the letters A-H) with its top-left corner at ``xy``, each font
    pixel a ``scale`` x ``scale`` block."""
    x0, y0 = xy
    for i, ch in enumerate(text):
        left = x0 + i * (GLYPH_WIDTH + 1) * scale
        for x, y in _PIXELS[ch]:
            bx, by = left + x * scale, y0 + y * scale
            draw.rectangle((bx, by, bx + scale - 1, by + scale - 1), fill=fill)
