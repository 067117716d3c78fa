"""Visual features through the API (`model.features`): our tower, pooling, projector and AnyRes packing equal
transformers' get_video_features / get_image_features / pack_image_features on the same pixels."""

import pytest
import torch
from PIL import Image

import videoqa
from conftest import asset, build_video_llava, needs_assets
from videoqa.features import pack
from videoqa.pixels import anyres_pixels, best_resolution, clip_pixels

pytestmark = needs_assets
VIDEO = "videos/videollava_sample_demo_1.mp4"


@pytest.fixture(scope="module")
def model_224(tmp_path_factory):
    """A 224 px / 14 px tower, as in the real checkpoint: 256 patches + CLS per frame."""
    path = build_video_llava(tmp_path_factory.mktemp("tiny-224"), image_size=224)
    return videoqa.load(path, device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="module")
def next_video(tiny_next_video):
    return videoqa.load(tiny_next_video, device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="module")
def next_image(tiny_next):
    return videoqa.load(tiny_next, device="cpu", dtype="float32", cache=False)


def video_reference(model, get_features, media):
    """transformers' features of the pixels our family makes of the same frames."""
    pixels = model.family.video.pixels(model.net.config, media.frames.pixels)
    with torch.inference_mode():
        return get_features(pixel_values_videos=torch.from_numpy(pixels)[None]).pooler_output.flatten(0, 1)


def test_video_features_keep_cls_257_per_frame(model_224):
    media = model_224.media(asset(VIDEO))
    ours = model_224.features(media)
    assert ours.shape == (8 * 257, model_224.net.config.text_config.hidden_size)
    assert torch.equal(ours, video_reference(model_224, model_224.net.model.get_video_features, media))


def test_image_features_drop_cls_256(model_224):
    image = Image.open(asset("images/videollava_desert.jpg")).convert("RGB")
    ours = model_224.features(asset("images/videollava_desert.jpg"))
    assert ours.shape == (256, model_224.net.config.text_config.hidden_size)
    with torch.inference_mode():
        pixels = torch.from_numpy(clip_pixels([image], 224))
        reference = model_224.net.get_image_features(pixel_values=pixels).pooler_output
    assert torch.equal(ours, reference.flatten(0, 1))


def test_next_video_features_pool_to_144_per_frame(next_video):
    media = next_video.media(asset(VIDEO))
    ours = next_video.features(media)
    assert ours.shape == (8 * 144, next_video.net.config.text_config.hidden_size)
    assert torch.equal(ours, video_reference(next_video, next_video.net.model.get_video_features, media))


@pytest.mark.parametrize("model", ["next_video", "next_image"])
def test_anyres_image_features(request, model):
    loaded = request.getfixturevalue(model)
    path = asset("images/videollava_waterview.jpg")  # 1000x667: a 672x672 grid
    ours = loaded.features(path)
    # base tile 24 x 24, then the 48 x 48 grid unpadded to 48 x 32 rows, each row ending with image_newline
    assert ours.shape == (576 + 32 * (48 + 1), loaded.net.config.text_config.hidden_size)
    image = Image.open(path).convert("RGB")
    pixels = torch.from_numpy(anyres_pixels(image, 336, loaded.net.config.image_grid_pinpoints))[None]
    with torch.inference_mode():
        reference = loaded.net.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[667, 1000]]))
    assert torch.equal(ours, reference.pooler_output[0])


# (height, width): landscape, portrait, square, wide and tall strips, a sliver, odd sizes
SIZES = [(667, 1000), (1024, 576), (225, 225), (300, 1000), (667, 200), (400, 13), (479, 641), (1001, 333)]


@pytest.mark.parametrize("size", SIZES)
def test_pack_equals_transformers(next_image, size):
    net = next_image.net
    grid_height, grid_width = best_resolution(size, net.config.image_grid_pinpoints)
    count = 1 + (grid_height // 336) * (grid_width // 336)
    tiles = torch.randn(count, 576, 64, generator=torch.Generator().manual_seed(0))  # (base + grid tiles, T, D)
    reference, _ = net.model.pack_image_features([tiles], torch.tensor([size]), "default", net.model.image_newline)
    assert torch.equal(pack(net, tiles, size), reference[0])
