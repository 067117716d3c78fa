"""Visual features: our tower + projector calls equal transformers' get_video_features / get_image_features."""

import numpy as np
import pytest
import torch

from conftest import build_video_llava, needs_assets
from videoqa.features import image_features, video_features


@pytest.fixture(scope="module")
def net_224(tmp_path_factory):
    """A 224 px / 14 px tower, as in the real checkpoint: 256 patches + CLS per frame."""
    from transformers import VideoLlavaForConditionalGeneration

    path = build_video_llava(tmp_path_factory.mktemp("tiny-224"), image_size=224)
    return VideoLlavaForConditionalGeneration.from_pretrained(path).eval()


@needs_assets
def test_video_features_keep_cls_257_per_frame(net_224):
    pixels = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    ours = video_features(net_224, pixels)
    assert ours.shape == (8 * 257, net_224.config.text_config.hidden_size)
    with torch.inference_mode():
        reference = net_224.model.get_video_features(pixel_values_videos=torch.from_numpy(pixels)[None]).pooler_output
    assert torch.equal(ours, reference.flatten(0, 1))


@needs_assets
def test_image_features_drop_cls_256(net_224):
    pixels = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ours = image_features(net_224, pixels)
    assert ours.shape == (256, net_224.config.text_config.hidden_size)
    with torch.inference_mode():
        reference = net_224.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
    assert torch.equal(ours, reference.flatten(0, 1))
