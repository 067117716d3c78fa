"""Our Pillow CLIP preprocessing equals transformers' CLIPImageProcessorPil on real frames."""

import numpy as np
import pytest
from PIL import Image

from conftest import asset, needs_assets
from videoqa.frames import read_frames
from videoqa.pixels import clip_pixels


def reference(images, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images, return_tensors="np").pixel_values


@needs_assets
@pytest.mark.parametrize(
    "video", ["videollava_sample_demo_1.mp4", "videollava_sample_demo_22.mp4", "videollava_assets_demo.mp4"]
)
@pytest.mark.parametrize("size", [224, 336])
def test_frames_match_the_pil_processor(video, size):
    frames = read_frames(asset(f"videos/{video}"), 3).pixels  # landscape, portrait, 2048x1810
    ours = clip_pixels(frames, size)
    assert ours.shape == (3, 3, size, size) and ours.dtype == np.float32
    assert np.abs(ours - reference(list(frames), size)).max() < 1e-5


@needs_assets
@pytest.mark.parametrize("image", ["videollava_desert.jpg", "videollava_sample_img_13.png"])
def test_images_match_the_pil_processor(image):
    picture = Image.open(asset(f"images/{image}"))
    ours = clip_pixels([picture], 224)
    assert np.abs(ours - reference([picture.convert("RGB")], 224)).max() < 1e-5


def test_hand_computed_values():
    # A flat 2x3 image: resize keeps it flat, crop keeps the centre, so every pixel is (v/255 - mean) / std.
    frame = np.full((1, 20, 30, 3), (255, 0, 128), np.uint8)
    out = clip_pixels(frame, 10)
    expected = [(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258, (128 / 255 - 0.40821073) / 0.27577711]
    assert out.shape == (1, 3, 10, 10)
    assert out[0, :, 5, 5] == pytest.approx(expected, abs=1e-5)
