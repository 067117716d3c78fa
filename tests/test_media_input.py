"""Awkward but valid media, and media that cannot be read: tiny frames, odd names, permissions, pipes, images by
content, huge images. Valid input is answered; the rest is one `error:` line and exit code 3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_assets
from videoqa.frames import frame_indices, read_frames
from videoqa.pixels import clip_pixels

QUESTION = "What happens?"


CODECS = {".mov": ("png", "rgb24"), ".mkv": ("ffv1", "bgr0")}  # lossless; PNG takes any size, FFV1 not 1 x N


def write_video(path: Path, width: int, height: int, count: int = 3) -> list[np.ndarray]:
    """Random RGB frames, losslessly coded; returns the frames written."""
    import av

    rng = np.random.default_rng(width * 1000 + height)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[path.suffix][0], rate=5)
        stream.width, stream.height, stream.pix_fmt = width, height, CODECS[path.suffix][1]
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return frames


# Widths whose RGB rows FFmpeg pads to a multiple of the width (1-48, 96, 144 px): decord then reports the padding
# as extra channels. Heights of 1 and 2 px, and sizes that were already read right, for contrast.
SIZES = [(1, 1), (1, 24), (2, 24), (3, 5), (4, 24), (6, 24), (8, 24), (16, 24), (32, 24), (48, 10), (96, 4),
         (144, 4), (24, 1), (64, 2), (30, 24), (64, 24), (7, 5)]


@pytest.mark.parametrize("width, height", SIZES)
def test_tiny_frames_are_read_exactly(tmp_path, width, height):
    written = write_video(tmp_path / "tiny.mov", width, height)
    frames = read_frames(tmp_path / "tiny.mov", 3)
    assert frames.indices == [0, 1, 2]
    assert frames.pixels.shape == (3, height, width, 3)
    assert np.array_equal(frames.pixels, np.stack(written))


def pil_reference(images, size: int) -> np.ndarray:
    """transformers' CLIPImageProcessorPil; given PIL images, it cannot take a 3-px-tall array for channels-first."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images, return_tensors="np").pixel_values


@pytest.mark.parametrize("width, height", [(1, 1), (1, 24), (3, 5), (16, 24), (24, 1), (144, 4)])
@pytest.mark.parametrize("size", [224, 336])
def test_tiny_frames_match_the_pil_processor(tmp_path, width, height, size):
    from PIL import Image

    write_video(tmp_path / "tiny.mov", width, height)
    frames = read_frames(tmp_path / "tiny.mov", 3).pixels
    ours = clip_pixels(frames, size)
    assert ours.shape == (3, 3, size, size)
    assert np.abs(ours - pil_reference([Image.fromarray(f) for f in frames], size)).max() < 1e-5


@needs_assets
@pytest.mark.parametrize("name, width, height", [("tiny.mkv", 16, 24), ("tiny.mov", 1, 1), ("tiny.mov", 24, 1)])
def test_tiny_video_is_answered(cli, tiny_model, tmp_path, name, width, height):
    write_video(tmp_path / name, width, height)
    result = cli("ask", tmp_path / name, QUESTION, "-m", tiny_model, "-n", 4, "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    assert len(record["tokens"]) == 4 and [f["index"] for f in record["frames"]] == frame_indices(3, 8)
