"""A contact sheet: a video's sampled frames drawn in a grid, each labelled with its time (and, under --explain, the
share of the answer's attention it drew), as a PNG, with Pillow.

The layout is fixed by the frames' count N and size H x W, the columns (default ceil(sqrt(N))) and the tile width,
so its size can be worked out by hand: with rows = ceil(N / columns), tile_height = round(H * tile_width / W) and
LABEL = label_height(tile_width),

    width  = columns * tile_width + (columns + 1) * PAD
    height = rows * (tile_height + LABEL) + (rows + 1) * PAD

Tile (row r, column c) has its frame's top-left corner at (PAD + c * (tile_width + PAD),
PAD + r * (tile_height + LABEL + PAD)); its label strip, LABEL high, lies right under the frame: first the
attention bar (BAR high, its full length the tile's width for the most-looked-at frame), then the text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from videoqa.errors import Exit, VideoQAError
from videoqa.names import display

PAD = 8  # px between tiles and around the grid
BAR = 4  # px: height of the attention bar under each frame
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
BAR_TRACK = (64, 64, 64)  # the bar's empty part, so a short bar still reads as a share of a whole
BAR_FILL = (255, 176, 0)


def font_size(tile_width: int) -> int:
    """Legible at a glance: about a fourteenth of the tile's width, never under 14 px."""
    return max(14, round(tile_width / 14))


def label_height(tile_width: int) -> int:
    """The strip under a frame: the bar, then one line of text with room for its ascent and descent."""
    return BAR + round(font_size(tile_width) * 1.6)


def clock(seconds: float) -> str:
    """`M:SS.s`, or `H:MM:SS.s` from an hour on; rounded (half up) to the tenth first, so 59.96 s reads 1:00.0, not
    0:60.0."""
    tenths = math.floor(seconds * 10 + 0.5)
    hours, rest = divmod(tenths, 36000)
    minutes, tenths = divmod(rest, 600)
    second = f"{tenths // 10:02d}.{tenths % 10}"
    return f"{hours}:{minutes:02d}:{second}" if hours else f"{minutes}:{second}"


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans where it is installed; else Pillow's own scalable font, at the same size."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _check(pixels: np.ndarray, times: Sequence[float], shares: Sequence[float] | None, columns: int | None) -> None:
    """Callers pass what the sampler produced; a mismatch is a bug, not a user's mistake."""
    if pixels.ndim != 4 or pixels.shape[0] < 1 or pixels.shape[3] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be (N>=1, H, W, 3) uint8, not {pixels.shape} {pixels.dtype}")
    if len(times) != len(pixels):
        raise ValueError(f"{len(pixels)} frames but {len(times)} times")
    if shares is not None and len(shares) != len(pixels):
        raise ValueError(f"{len(pixels)} frames but {len(shares)} shares")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, not {columns}")


def _label(draw: ImageDraw.ImageDraw, x: int, y: int, tile_width: int, time: float, share: float | None,
           longest: float) -> None:
    """The strip whose top-left corner is (x, y): the attention bar where shares are known, then the time (left)
    and the share (right)."""
    if share is not None:
        draw.rectangle((x, y, x + tile_width - 1, y + BAR - 1), fill=BAR_TRACK)
        length = round(tile_width * share / longest) if longest > 0 else 0
        if length > 0:
            draw.rectangle((x, y, x + length - 1, y + BAR - 1), fill=BAR_FILL)
    size = font_size(tile_width)
    font, top = _font(size), y + BAR + round(size * 0.2)
    draw.text((x, top), clock(time), fill=TEXT, font=font)
    if share is not None:
        draw.text((x + tile_width, top), f"{share * 100:.1f}%", fill=TEXT, font=font, anchor="ra")


def contact_sheet(pixels: np.ndarray, times: Sequence[float], path: str | Path, *, shares: Sequence[float] | None = None,
                  columns: int | None = None, tile_width: int = 320) -> tuple[int, int]:
    """Write the frames as a grid PNG at `path` and return its (width, height), as the module docstring works out.

    `shares` (one per frame, 0..1) add each frame's percentage and a bar scaled to the largest share. A path that
    cannot be written is the user's to fix: VideoQAError(Exit.USAGE), as for `--out`."""
    _check(pixels, times, shares, columns)
    n, h, w = pixels.shape[:3]
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    tile_height, label = round(h * tile_width / w), label_height(tile_width)
    size = (columns * tile_width + (columns + 1) * PAD, rows * (tile_height + label) + (rows + 1) * PAD)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    longest = max(shares) if shares is not None else 0.0
    for i, frame in enumerate(pixels):
        row, column = divmod(i, columns)
        x, y = PAD + column * (tile_width + PAD), PAD + row * (tile_height + label + PAD)
        tile = Image.fromarray(frame).resize((tile_width, tile_height), Image.Resampling.LANCZOS)
        sheet.paste(tile, (x, y))
        _label(draw, x, y + tile_height, tile_width, times[i], None if shares is None else shares[i], longest)
    try:
        sheet.save(path, format="PNG")
    except OSError as e:
        raise VideoQAError(f"{display(path)}: cannot write the contact sheet ({e.strerror or e})", Exit.USAGE) from None
    return size
