"""Our Qwen2.5-VL and Qwen3-VL pixels equal transformers' own: images against `Qwen2VLImageProcessorPil`, videos
against `Qwen2VLVideoProcessor` / `Qwen3VLVideoProcessor` run on torchvision 0.27's resize and normalize
transcribed into torch (tests/torchvision_port.py), with the checkpoints' preprocessor configs, bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import asset, needs_assets
from torchvision_port import fake_torchvision
from videoqa import pixels, resize
from videoqa.errors import Exit, VideoQAError
from videoqa.pixels import qwen_image_pixels, qwen_video_pixels, smart_resize

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Qwen/Qwen2.5-VL-3B-Instruct: preprocessor_config.json, which its video processor reads too (no video config)
QWEN25 = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
          "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
# Qwen/Qwen3-VL-2B-Instruct: preprocessor_config.json and video_preprocessor_config.json
QWEN3 = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
QWEN3_IMAGE = {**QWEN3, "size": {"longest_edge": 16777216, "shortest_edge": 65536}}
QWEN3_VIDEO = {**QWEN3, "size": {"longest_edge": 25165824, "shortest_edge": 4096}}


def ours(config: dict) -> dict:
    """Our keyword arguments from a preprocessor config, as a family passes them."""
    size = config.get("size", {})
    return {"patch_size": config["patch_size"], "merge_size": config["merge_size"],
            "temporal_patch_size": config["temporal_patch_size"], "image_mean": config["image_mean"],
            "image_std": config["image_std"], "min_pixels": config.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": config.get("max_pixels", size.get("longest_edge"))}


def decoded(video: str, count: int, crop: tuple[slice, slice] | None = None) -> np.ndarray:
    """The first `count` frames of a real video, decoded by PyAV: (count, H, W, 3) uint8."""
    import av

    with av.open(str(asset(f"videos/{video}"))) as container:
        frames = [frame.to_ndarray(format="rgb24") for _, frame in zip(range(count), container.decode(video=0))]
    frames = np.stack(frames)
    return np.ascontiguousarray(frames[:, crop[0], crop[1]]) if crop else frames


CLIPS = {  # sides that are not multiples of 28 or 32, odd and even frame counts
    "portrait 204x360, 5 frames": ("videollava_sample_demo_22.mp4", 5, None),
    "crop 150x97, 3 frames": ("videollava_sample_demo_1.mp4", 3, (slice(100, 197), slice(200, 350))),
    "landscape 640x360, 4 frames": ("videollava_sample_demo_1.mp4", 4, None),
}


def reference_video(family: str, config: dict, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, ...]]:
    """transformers' own video processor for the family, as its checkpoints build it, on the fake torchvision."""
    with fake_torchvision():
        if family == "qwen2.5":
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as Processor
        else:
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as Processor
        out = Processor(**config)(videos=[frames], do_sample_frames=False, return_tensors="pt")
    return out.pixel_values_videos, tuple(out.video_grid_thw[0].tolist())


def ours_video(family: str, config: dict, frames: np.ndarray, **changes) -> tuple[torch.Tensor, tuple[int, ...]]:
    return qwen_video_pixels(frames, **{**ours(config), "clip_budget": family == "qwen3", **changes})


VIDEO_CONFIGS = {
    "qwen2.5": QWEN25,
    "qwen2.5 small max_pixels": {**QWEN25, "max_pixels": 28 * 28 * 24},  # frames shrunk to fit
    "qwen3": QWEN3_VIDEO,
    "qwen3 small clip budget": {**QWEN3_VIDEO, "size": {"longest_edge": 32 * 32 * 60, "shortest_edge": 4096}},
}


@needs_assets
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("setting", VIDEO_CONFIGS)
def test_videos_match_transformers_video_processors(setting, clip):
    family, config = setting.split()[0], VIDEO_CONFIGS[setting]
    frames = decoded(*CLIPS[clip])
    reference, reference_grid = reference_video(family, config, frames)
    patches, grid = ours_video(family, config, frames)
    assert grid == reference_grid and grid[0] == -(-len(frames) // 2)
    assert patches.shape == reference.shape and patches.dtype == torch.float32
    assert torch.equal(patches, reference), (patches - reference).abs().max()


@needs_assets
def test_an_odd_frame_count_repeats_the_last_frame():
    frames = decoded(*CLIPS["crop 150x97, 3 frames"])
    padded, grid = ours_video("qwen2.5", QWEN25, np.concatenate([frames, frames[-1:]]))
    assert torch.equal(ours_video("qwen2.5", QWEN25, frames)[0], padded) and grid[0] == 2


@needs_assets
def test_the_video_comparison_catches_a_wrong_filter_size_or_order(monkeypatch):
    frames = decoded(*CLIPS["crop 150x97, 3 frames"])
    reference, _ = reference_video("qwen2.5", QWEN25, frames)
    assert (ours_video("qwen2.5", QWEN25, frames, resample=2)[0] - reference).abs().max() > 1e-2  # bilinear
    narrower = np.ascontiguousarray(frames[:, :, :-1])  # 149 px: the same 140 px grid, other pixels
    patches, _ = ours_video("qwen2.5", QWEN25, narrower)
    assert patches.shape == reference.shape and (patches - reference).abs().max() > 1e-2
    with monkeypatch.context() as patch:  # uint8 through float and back, as torchvision does only off the CPU
        patch.setattr(resize, "native_uint8", lambda mode: False)
        assert (ours_video("qwen2.5", QWEN25, frames)[0] - reference).abs().max() > 1e-2
    with monkeypatch.context() as patch:  # the PIL processors' order: x / 255 first, then (x - mean) / std
        patch.setattr(pixels, "_fused_normalise", lambda video, mean, std: torch.from_numpy(
            ((video.numpy().astype(np.float64) / 255).astype(np.float32) - np.float32(mean)[:, None, None])
            / np.float32(std)[:, None, None]))
        patches, _ = ours_video("qwen2.5", QWEN25, frames)
        assert not torch.equal(patches, reference) and (patches - reference).abs().max() < 1e-5


def test_resize_equals_the_torchvision_transcription(monkeypatch):
    import torchvision_port

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (1, 3, 20, 30), dtype=torch.uint8, generator=generator),
               torch.randint(0, 256, (4, 3, 20, 30), dtype=torch.uint8, generator=generator),
               torch.randint(0, 256, (2, 5, 3, 21, 13), dtype=torch.uint8, generator=generator)]
    batches += [batches[0].contiguous(memory_format=torch.channels_last), batches[1].float()]
    for capability in ("AVX512", "DEFAULT"):  # DEFAULT: bilinear uint8 goes through float, as on old x86
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        for images in batches:
            for mode in resize.MODES:
                for size in [(11, 17), (41, 45), tuple(images.shape[-2:])]:
                    theirs = torchvision_port.resize(images, list(size), torchvision_port.InterpolationMode(mode))
                    mine = resize.resize(images, size, mode=mode)
                    assert torch.equal(mine, theirs) and mine.dtype == theirs.dtype, (capability, mode, size)
                    assert mine.stride() == theirs.stride()


IMAGE_CONFIGS = {"qwen2.5": QWEN25, "qwen3": QWEN3_IMAGE, "qwen2.5 small max_pixels": {**QWEN25, "max_pixels": 50_000}}


def synthetic() -> dict[str, Image.Image]:
    """Odd sizes, noise (every resampling difference shows), tiny, narrow and transparent ones."""
    noise = np.random.default_rng(1).integers(0, 256, (301, 37, 3), dtype=np.uint8)
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (53, 90, 4), dtype=np.uint8), "RGBA")
    return {"noise 37x301": Image.fromarray(noise), "tiny 7x5": Image.fromarray(noise[:5, :7]),
            "strip 999x9": Image.fromarray(np.tile(noise[:9, :1], (1, 999, 1))), "transparent 90x53": rgba}


def reference_image(config: dict, image: Image.Image) -> tuple[np.ndarray, tuple[int, ...]]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil(**config)(image, return_tensors="np")
    return out.pixel_values, tuple(out.image_grid_thw[0].tolist())


@needs_assets
@pytest.mark.parametrize("setting", IMAGE_CONFIGS)
def test_images_match_the_pil_processor(setting):
    config = IMAGE_CONFIGS[setting]
    names = ("videollava_desert.jpg", "videollava_sample_img_13.png")
    real = {name: Image.open(asset(f"images/{name}")) for name in names}
    for name, image in {**real, **synthetic()}.items():
        reference, reference_grid = reference_image(config, image)
        patches, grid = qwen_image_pixels(image, **ours(config))
        assert grid == reference_grid and patches.dtype == torch.float32, name
        assert np.array_equal(patches.numpy(), reference), (name, np.abs(patches.numpy() - reference).max())


def test_the_image_comparison_catches_a_wrong_filter():
    image = synthetic()["noise 37x301"]
    reference, _ = reference_image(QWEN25, image)
    assert np.abs(qwen_image_pixels(image, **ours(QWEN25), resample=2)[0].numpy() - reference).max() > 1e-2


def test_smart_resize_by_hand():
    assert smart_resize(360, 640, factor=28, min_pixels=3136, max_pixels=12845056) == (364, 644)
    assert smart_resize(5, 7, factor=28, min_pixels=3136, max_pixels=12845056) == (56, 84)  # up to min_pixels
    # Qwen3-VL's video rule counts the clip: 5 frames round to 4 (banker's rounding) x 352 x 640 > the budget
    assert smart_resize(360, 640, factor=32, min_pixels=4096, max_pixels=32 * 32 * 60, frames=5) == (64, 128)
    assert smart_resize(360, 640, factor=32, min_pixels=4096, max_pixels=32 * 32 * 60) == (160, 320)


def test_too_narrow_pictures_and_one_frame_qwen3_clips_are_refused_as_transformers_does():
    with pytest.raises(VideoQAError) as narrow:
        qwen_image_pixels(Image.new("RGB", (2010, 10)), **ours(QWEN25))
    assert narrow.value.code == Exit.INPUT and "200" in str(narrow.value)
    with pytest.raises(ValueError, match="aspect ratio"):
        reference_image(QWEN25, Image.new("RGB", (2010, 10)))
    one = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(VideoQAError, match="at least 2 frames"):
        ours_video("qwen3", QWEN3_VIDEO, one)
    with pytest.raises(ValueError, match="temporal_factor"):
        reference_video("qwen3", QWEN3_VIDEO, one)
    patches, grid = ours_video("qwen2.5", QWEN25, one)  # Qwen2.5-VL repeats it instead
    assert grid == reference_video("qwen2.5", QWEN25, one)[1] == (1, 4, 4)
