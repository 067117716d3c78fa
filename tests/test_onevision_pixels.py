"""Our Pillow SigLIP and AnyRes-max preprocessing for LLaVA-OneVision equal transformers' PIL image processors
(`SiglipImageProcessorPil`, `LlavaOnevisionImageProcessorPil`) with the checkpoints' own settings; LLaVA-1.5's
preprocessor config is CLIP's 336 px rule, which `clip_pixels` already follows."""

import numpy as np
import pytest
from PIL import Image

from conftest import asset, needs_assets
from test_pixels import pictures
from videoqa.frames import read_frames
from videoqa.pixels import anyres_max_pixels, best_resolution, clip_pixels, siglip_pixels

# llava-onevision-qwen2-{0.5b,7b}-ov-hf: preprocessor_config.json (image) and video_processor/preprocessor_config.json
OV_SIZE = 384
OV_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]  # 36 grids, 1x1 to 6x6 tiles
SIGLIP = {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}

# llava-1.5-7b-hf: preprocessor_config.json (CLIPImageProcessor), verbatim but for the type fields
LLAVA_15 = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def onevision_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(image_grid_pinpoints=OV_PINPOINTS, **SIGLIP)


@needs_assets
@pytest.mark.parametrize(
    "video", ["videollava_sample_demo_1.mp4", "videollava_sample_demo_22.mp4", "videollava_assets_demo.mp4"]
)
def test_frames_match_the_siglip_processor(video):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    frames = read_frames(asset(f"videos/{video}"), 3).pixels  # landscape, portrait, 2048x1810
    ours = siglip_pixels(frames, OV_SIZE)
    assert ours.shape == (3, 3, OV_SIZE, OV_SIZE) and ours.dtype == np.float32
    reference = SiglipImageProcessorPil(**SIGLIP)(list(frames), return_tensors="np").pixel_values
    assert np.array_equal(ours, reference)


@needs_assets
def test_anyres_max_matches_the_onevision_processor():
    processor = onevision_processor()
    grids = set()
    for name, picture in pictures().items():
        ours = anyres_max_pixels(picture, OV_SIZE, OV_PINPOINTS)
        reference = processor(picture, return_tensors="np").pixel_values[0]
        assert ours.shape == reference.shape and ours.dtype == np.float32, name
        assert np.array_equal(ours, reference), name
        assert np.array_equal(ours[0], siglip_pixels([picture], OV_SIZE)[0]), name  # base tile = SigLIP squash
        grids.add(best_resolution((picture.height, picture.width), OV_PINPOINTS))
    assert len(grids) >= 5, grids  # 1x1 up to 3x1 and 1x3 grids among the pictures


@needs_assets
def test_a_large_picture_gets_a_large_grid():
    # 2048x1810 screen recording frame: a 6x5 grid (30 tiles) plus the base tile
    frame = Image.fromarray(read_frames(asset("videos/videollava_assets_demo.mp4"), 1).pixels[0])
    ours = anyres_max_pixels(frame, OV_SIZE, OV_PINPOINTS)
    reference = onevision_processor()(frame, return_tensors="np").pixel_values[0]
    assert ours.shape == reference.shape == (1 + 30, 3, OV_SIZE, OV_SIZE)
    assert np.array_equal(ours, reference)


def test_siglip_hand_computed_values():
    # A flat 20x30 image stays flat when squashed, so every pixel is (v / 255 - 0.5) / 0.5.
    frame = np.full((1, 20, 30, 3), (255, 0, 128), np.uint8)
    out = siglip_pixels(frame, 10)
    assert out.shape == (1, 3, 10, 10)
    assert out[0, :, 4, 7] == pytest.approx([1.0, -1.0, 128 / 255 * 2 - 1], abs=1e-6)


@needs_assets
@pytest.mark.parametrize("image", ["videollava_desert.jpg", "videollava_sample_img_13.png", "videollava_waterview.jpg"])
def test_llava_15_preprocessor_config_is_clip_336(image):
    """llava-1.5-7b-hf's preprocessor is CLIP's: shortest edge 336, centre crop 336, OpenAI mean/std (no padding to
    square, unlike the original LLaVA-1.5 repo's 'pad' aspect mode)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    picture = Image.open(asset(f"images/{image}")).convert("RGB")
    reference = CLIPImageProcessorPil(**LLAVA_15)([picture], return_tensors="np").pixel_values
    assert np.array_equal(clip_pixels([picture], 336), reference)


@needs_assets
def test_transparency_is_composited_onto_white_as_transformers_does():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    picture = Image.open(asset("images/videollava_waterview.jpg")).convert("RGBA").crop((0, 0, 500, 300))
    picture.putalpha(Image.linear_gradient("L").resize(picture.size))  # opaque at the bottom, clear at the top
    reference = SiglipImageProcessorPil(**SIGLIP)([picture], return_tensors="np").pixel_values
    assert np.array_equal(siglip_pixels([picture], OV_SIZE), reference)
    reference = onevision_processor()(picture, return_tensors="np").pixel_values[0]
    assert np.array_equal(anyres_max_pixels(picture, OV_SIZE, OV_PINPOINTS), reference)
