"""The contact sheet: its size is the documented formula, each tile shows its frame with a legible label, and the
attention bar is longest under the most-looked-at frame."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from conftest import ASSETS
from videoqa.errors import Exit, VideoQAError
from videoqa.sheet import BAR, BAR_FILL, PAD, clock, contact_sheet, label_height

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
H, W, TILE = 48, 64, 160
TILE_H = round(H * TILE / W)  # 120
LABEL = label_height(TILE)


def solid_frames() -> np.ndarray:
    return np.stack([np.full((H, W, 3), colour, np.uint8) for colour in COLOURS])


def origin(i: int, columns: int = 3) -> tuple[int, int]:
    """Top-left corner of frame i's tile, by hand from the module docstring."""
    row, column = divmod(i, columns)
    return PAD + column * (TILE + PAD), PAD + row * (TILE_H + LABEL + PAD)


def strip(sheet: np.ndarray, i: int) -> np.ndarray:
    x, y = origin(i)
    return sheet[y + TILE_H : y + TILE_H + LABEL, x : x + TILE]


def test_size_is_the_formula_and_tiles_show_their_frames(tmp_path):
    size = contact_sheet(solid_frames(), [0.0, 1.5, 3.25, 61.0, 3725.0], tmp_path / "s.png", tile_width=TILE)
    columns, rows = 3, 2  # ceil(sqrt(5)), ceil(5 / 3)
    expected = (columns * TILE + (columns + 1) * PAD, rows * (TILE_H + LABEL) + (rows + 1) * PAD)
    with Image.open(tmp_path / "s.png") as image:
        assert image.format == "PNG" and size == image.size == expected
        sheet = np.asarray(image.convert("RGB"))
    for i, colour in enumerate(COLOURS):
        x, y = origin(i)
        assert tuple(sheet[y + TILE_H // 2, x + TILE // 2]) == colour
        assert tuple(sheet[y, x]) == colour and tuple(sheet[y + TILE_H - 1, x + TILE - 1]) == colour
        assert (strip(sheet, i).min(axis=2) > 200).sum() > 20, f"no text under tile {i}"
    x, y = origin(5)  # the grid's sixth cell is empty
    assert (sheet[y : y + TILE_H + LABEL, x : x + TILE] == (24, 24, 24)).all()


def test_the_most_looked_at_frame_has_the_full_bar(tmp_path):
    shares = [0.1, 0.5, 0.2, 0.1, 0.1]
    contact_sheet(solid_frames(), [0, 1, 2, 3, 4], tmp_path / "s.png", shares=shares, tile_width=TILE)
    sheet = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    bars = [int((strip(sheet, i)[:BAR] == BAR_FILL).all(axis=2).sum()) for i in range(5)]
    assert bars[1] == TILE * BAR and all(bars[i] < bars[1] for i in (0, 2, 3, 4))
    assert bars[2] == round(TILE * 0.2 / 0.5) * BAR


def test_default_columns_make_a_square_ish_grid(tmp_path):
    frames = np.zeros((8, 10, 20, 3), np.uint8)
    width, height = contact_sheet(frames, range(8), tmp_path / "s.png", tile_width=100)
    assert (width, height) == (3 * 100 + 4 * PAD, 3 * (50 + label_height(100)) + 4 * PAD)
    one = contact_sheet(frames[:1], [0], tmp_path / "one.png", tile_width=100)
    assert one == (100 + 2 * PAD, 50 + label_height(100) + 2 * PAD)


@pytest.mark.parametrize(
    "seconds, text", [(0, "0:00.0"), (3.5, "0:03.5"), (59.96, "1:00.0"), (721, "12:01.0"), (3.25, "0:03.3"), (3725.25, "1:02:05.3")]
)
def test_clock(seconds, text):
    assert clock(seconds) == text


def test_an_unwritable_path_is_the_users_to_fix(tmp_path):
    path = tmp_path / "missing-dir" / "x.png"
    with pytest.raises(VideoQAError, match="missing-dir/x.png: cannot write the contact sheet") as raised:
        contact_sheet(solid_frames(), range(5), path, tile_width=TILE)
    assert raised.value.code == Exit.USAGE


def test_times_must_match_the_frames(tmp_path):
    with pytest.raises(ValueError):
        contact_sheet(solid_frames(), [0, 1], tmp_path / "s.png")
    with pytest.raises(ValueError):
        contact_sheet(solid_frames(), range(5), tmp_path / "s.png", shares=[1.0])


def test_a_real_video(tmp_path):
    videos = sorted((ASSETS / "videos").glob("*.mp4"))
    if not videos:
        pytest.skip("no .mp4 in ../shared/assets/videos")
    av = pytest.importorskip("av")
    with av.open(str(videos[0])) as container:
        decoded = [(f.to_ndarray(format="rgb24"), float(f.time)) for f, _ in zip(container.decode(video=0), range(4))]
    pixels, times = np.stack([p for p, _ in decoded]), [t for _, t in decoded]
    n, h, w = pixels.shape[:3]
    size = contact_sheet(pixels, times, tmp_path / "real.png", shares=[0.4, 0.3, 0.2, 0.1])
    columns = rows = math.ceil(math.sqrt(n))
    tile_height = round(h * 320 / w)
    assert size == (columns * 320 + (columns + 1) * PAD, rows * (tile_height + label_height(320)) + (rows + 1) * PAD)
    with Image.open(tmp_path / "real.png") as image:
        assert image.size == size
