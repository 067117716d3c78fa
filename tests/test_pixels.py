"""Our Pillow CLIP and AnyRes preprocessing equal transformers' CLIPImageProcessorPil and LlavaNextImageProcessorPil
on real frames and pictures."""

import numpy as np
import pytest
from PIL import Image

from conftest import asset, needs_assets
from videoqa.frames import read_frames
from videoqa.pixels import anyres_pixels, best_resolution, clip_pixels


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
    assert np.array_equal(ours, reference(list(frames), size))


@needs_assets
@pytest.mark.parametrize("image", ["videollava_desert.jpg", "videollava_sample_img_13.png"])
def test_images_match_the_pil_processor(image):
    picture = Image.open(asset(f"images/{image}"))
    ours = clip_pixels([picture], 224)
    assert np.array_equal(ours, reference([picture.convert("RGB")], 224))


def test_hand_computed_values():
    # A flat 2x3 image: resize keeps it flat, crop keeps the centre, so every pixel is (v/255 - mean) / std.
    frame = np.full((1, 20, 30, 3), (255, 0, 128), np.uint8)
    out = clip_pixels(frame, 10)
    expected = [(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258, (128 / 255 - 0.40821073) / 0.27577711]
    assert out.shape == (1, 3, 10, 10)
    assert out[0, :, 5, 5] == pytest.approx(expected, abs=1e-5)


PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # the LLaVA-NeXT(-Video) checkpoints'


def pictures() -> dict[str, Image.Image]:
    """Real pictures of every shape AnyRes has a grid for (the image assets hold no portrait: a video frame is one)."""
    waterview = Image.open(asset("images/videollava_waterview.jpg")).convert("RGB")
    portrait = Image.fromarray(read_frames(asset("videos/llavanext_docs_jobs.mp4"), 1).pixels[0])
    return {
        "landscape 1000x667": waterview,
        "portrait 576x1024": portrait,
        "square 225x225": Image.open(asset("images/videollava_sample_img_22.png")).convert("RGB"),
        "small 300x168": Image.open(asset("images/videollava_sample_img_13.png")).convert("RGB"),
        "wide strip 1000x300": waterview.crop((0, 0, 1000, 300)),
        "tall strip 200x667": waterview.crop((0, 0, 200, 667)),
        "taller strip 300x1024": portrait.crop((0, 0, 300, 1024)),
    }


@needs_assets
def test_anyres_matches_the_llava_next_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           image_grid_pinpoints=PINPOINTS)
    grids = set()
    for name, picture in pictures().items():
        ours = anyres_pixels(picture, 336, PINPOINTS)
        reference = processor(picture, return_tensors="np").pixel_values[0]
        assert ours.shape == reference.shape and ours.dtype == np.float32, name
        assert np.array_equal(ours, reference), name
        grids.add(best_resolution((picture.height, picture.width), PINPOINTS))
    assert len(grids) == len(PINPOINTS)  # every grid was exercised


def test_best_resolution_keeps_the_most_pixels_then_wastes_the_least():
    assert best_resolution((100, 100), PINPOINTS) == (336, 672)  # all keep 100x100: the first of the smallest
    assert best_resolution((1000, 1000), PINPOINTS) == (672, 672)
    assert best_resolution((300, 1000), PINPOINTS) == (336, 1008)
