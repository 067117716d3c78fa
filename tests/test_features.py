"""Visual features: our tower, pooling, projector and AnyRes packing equal transformers' get_video_features /
get_image_features / pack_image_features."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import asset, build_video_llava, needs_assets
from videoqa.features import image_features, pack, video_features
from videoqa.pixels import anyres_pixels, best_resolution, clip_pixels

pytestmark = needs_assets


@pytest.fixture(scope="module")
def net_224(tmp_path_factory):
    """A 224 px / 14 px tower, as in the real checkpoint: 256 patches + CLS per frame."""
    from transformers import VideoLlavaForConditionalGeneration

    path = build_video_llava(tmp_path_factory.mktemp("tiny-224"), image_size=224)
    return VideoLlavaForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def next_video(tiny_next_video):
    from transformers import LlavaNextVideoForConditionalGeneration

    return LlavaNextVideoForConditionalGeneration.from_pretrained(tiny_next_video).eval()


@pytest.fixture(scope="module")
def next_image(tiny_next):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(tiny_next).eval()


def test_video_features_keep_cls_257_per_frame(net_224):
    pixels = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    ours = video_features(net_224, pixels)
    assert ours.shape == (8 * 257, net_224.config.text_config.hidden_size)
    with torch.inference_mode():
        reference = net_224.model.get_video_features(pixel_values_videos=torch.from_numpy(pixels)[None]).pooler_output
    assert torch.equal(ours, reference.flatten(0, 1))


def test_image_features_drop_cls_256(net_224):
    image = Image.open(asset("images/videollava_desert.jpg")).convert("RGB")
    ours = image_features(net_224, image)
    assert ours.shape == (256, net_224.config.text_config.hidden_size)
    with torch.inference_mode():
        reference = net_224.get_image_features(pixel_values=torch.from_numpy(clip_pixels([image], 224))).pooler_output
    assert torch.equal(ours, reference.flatten(0, 1))


def test_next_video_features_pool_to_144_per_frame(next_video):
    pixels = np.random.default_rng(2).standard_normal((8, 3, 336, 336)).astype(np.float32)
    ours = video_features(next_video, pixels)
    assert ours.shape == (8 * 144, next_video.config.text_config.hidden_size)
    with torch.inference_mode():
        reference = next_video.model.get_video_features(pixel_values_videos=torch.from_numpy(pixels)[None])
    assert torch.equal(ours, reference.pooler_output.flatten(0, 1))


@pytest.mark.parametrize("model", ["next_video", "next_image"])
def test_anyres_image_features(request, model):
    net = request.getfixturevalue(model)
    image = Image.open(asset("images/videollava_waterview.jpg")).convert("RGB")  # 1000x667: a 672x672 grid
    ours = image_features(net, image)
    # base tile 24 x 24, then the 48 x 48 grid unpadded to 48 x 32 rows, each row ending with image_newline
    assert ours.shape == (576 + 32 * (48 + 1), net.config.text_config.hidden_size)
    pixels = torch.from_numpy(anyres_pixels(image, 336, net.config.image_grid_pinpoints))[None]
    with torch.inference_mode():
        reference = net.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[667, 1000]]))
    assert torch.equal(ours, reference.pooler_output[0])


# (height, width): landscape, portrait, square, wide and tall strips, a sliver, odd sizes
SIZES = [(667, 1000), (1024, 576), (225, 225), (300, 1000), (667, 200), (400, 13), (479, 641), (1001, 333)]


@pytest.mark.parametrize("size", SIZES)
def test_pack_equals_transformers(next_image, size):
    grid_height, grid_width = best_resolution(size, next_image.config.image_grid_pinpoints)
    count = 1 + (grid_height // 336) * (grid_width // 336)
    tiles = torch.randn(count, 576, 64, generator=torch.Generator().manual_seed(0))  # (base + grid tiles, T, D)
    model = next_image.model
    reference, _ = model.pack_image_features([tiles], torch.tensor([size]), "default", model.image_newline)
    assert torch.equal(pack(next_image, tiles, size), reference[0])
