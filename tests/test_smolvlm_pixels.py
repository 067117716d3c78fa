"""Our SmolVLM2 pixels equal transformers' own: pictures against `SmolVLMImageProcessorPil` (tiles, global image,
rows and cols), video frames against `SmolVLMVideoProcessor` run on torchvision 0.27's Lanczos resize transcribed
into torch (tests/torchvision_port.py), both built from the checkpoint's preprocessor config, bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import asset, needs_assets
from test_qwen_pixels import CLIPS, decoded, synthetic
from torchvision_port import fake_torchvision
from videoqa.pixels import smolvlm_image_pixels, smolvlm_video_pixels

# HuggingFaceTB/SmolVLM2-256M-Video-Instruct: preprocessor_config.json, verbatim but for the type fields; the
# checkpoint has no video_preprocessor_config.json, so its video processor is built from this too
SMOLVLM2 = {
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 512}, "resample": 1, "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 2048},
    "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}},
}


def ours(config: dict, **changes) -> dict:
    """Our keyword arguments from the preprocessor config, as the family passes them."""
    return {"size": config["size"]["longest_edge"], "max_image_size": config["max_image_size"]["longest_edge"],
            "image_mean": config["image_mean"], "image_std": config["image_std"], "resample": config["resample"],
            **changes}


def reference_video(frames: np.ndarray, config: dict = SMOLVLM2):
    """transformers' SmolVLMVideoProcessor as the checkpoint builds it, on the fake torchvision: its processor too."""
    with fake_torchvision():
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        processor = SmolVLMVideoProcessor(**config)
        return processor(videos=[frames], return_tensors="pt"), processor


@needs_assets
@pytest.mark.parametrize("clip", list(CLIPS)[:2])
def test_videos_match_the_video_processor(clip):
    frames = decoded(*CLIPS[clip])
    reference, processor = reference_video(frames)
    assert processor.size["longest_edge"] == 2048  # `size` wins over video_sampling.video_size (512)
    pixels = smolvlm_video_pixels(frames, **ours(SMOLVLM2))
    assert pixels.shape == reference.pixel_values.shape == (1, len(frames), 3, 512, 512)
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels, reference.pixel_values), (pixels - reference.pixel_values).abs().max()
    assert bool((reference.pixel_attention_mask == 1).all())  # nothing padded: the model's default mask


@needs_assets
def test_the_video_comparison_catches_a_wrong_filter_or_size():
    frames = decoded(*CLIPS["crop 150x97, 3 frames"])
    reference = reference_video(frames)[0].pixel_values
    assert (smolvlm_video_pixels(frames, **ours(SMOLVLM2, resample=3)) - reference).abs().max() > 1e-2  # bicubic
    assert (smolvlm_video_pixels(frames, **ours(SMOLVLM2, size=512)) - reference).abs().max() > 1e-2  # video_size
    assert (smolvlm_video_pixels(frames, **ours(SMOLVLM2, size=2046)) - reference).abs().max() > 1e-2


def reference_image(image: Image.Image, config: dict = SMOLVLM2):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    out = SmolVLMImageProcessorPil(**config)(image, return_tensors="np", return_row_col_info=True)
    assert (out.pixel_attention_mask == 1).all()  # every tile full
    return out.pixel_values, (out["rows"][0][0], out["cols"][0][0])


def pictures() -> dict[str, Image.Image]:
    """A real picture (scaled up to 2048 px, 3 x 4 tiles) and odd synthetic ones: portrait, strip, transparent."""
    noise = synthetic()
    return {
        "small 300x168": Image.open(asset("images/videollava_sample_img_13.png")),
        "portrait noise 37x301": noise["noise 37x301"],
        "strip 999x9": noise["strip 999x9"],
        "transparent 90x53": noise["transparent 90x53"],
    }


@needs_assets
def test_pictures_match_the_pil_processor():
    splits = set()
    for name, image in pictures().items():
        reference, reference_split = reference_image(image)
        pixels, split = smolvlm_image_pixels(image, **ours(SMOLVLM2))
        assert split == reference_split and pixels.shape == reference.shape, (name, split, reference.shape)
        assert pixels.shape[1] == split[0] * split[1] + 1 and pixels.dtype == torch.float32, name
        assert np.array_equal(pixels.numpy(), reference), (name, np.abs(pixels.numpy() - reference).max())
        splits.add(split)
    assert splits == {(3, 4), (4, 1), (1, 4)}, splits  # landscape, portrait and strip grids


@needs_assets
def test_unsplit_pictures_and_smaller_configs_match():
    unsplit = {**SMOLVLM2, "do_image_splitting": False}
    smaller = {**SMOLVLM2, "size": {"longest_edge": 384}, "max_image_size": {"longest_edge": 384}}  # one tile
    image = Image.open(asset("images/videollava_desert.jpg"))  # 720x478
    for config, changes in [(unsplit, {"do_image_splitting": False}), (smaller, {})]:
        reference, reference_split = reference_image(image, config)
        pixels, split = smolvlm_image_pixels(image, **ours(config, **changes))
        assert split == reference_split == (0, 0) and pixels.shape[1] == 1
        assert np.array_equal(pixels.numpy(), reference)


def test_the_picture_comparison_catches_a_wrong_filter():
    image = synthetic()["noise 37x301"]
    reference, _ = reference_image(image)
    assert np.abs(smolvlm_image_pixels(image, **ours(SMOLVLM2, resample=3))[0].numpy() - reference).max() > 1e-2
