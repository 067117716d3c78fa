"""Frame sampling: the training-code rule, timestamps, and awkward real videos."""

from pathlib import Path

import numpy as np
import pytest

from conftest import asset, needs_assets
from videoqa.errors import VideoQAError
from videoqa.frames import frame_indices, read_frames


def test_indices_follow_the_training_rule():
    # np.linspace(0, 242, 8) = 0, 34.57, 69.14, 103.71, 138.29, 172.86, 207.43, 242 -> truncated
    assert frame_indices(243, 8) == [0, 34, 69, 103, 138, 172, 207, 242]
    assert frame_indices(3, 8) == [0, 0, 0, 0, 1, 1, 1, 2]  # fewer frames than asked repeat
    assert frame_indices(1, 4) == [0, 0, 0, 0]
    assert frame_indices(100, 1) == [0]


def write_counting_video(path: Path, count: int, fps: int) -> None:
    """Frame i is a flat grey of value 20 * i, so a decoded frame tells its own index."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_sampled_frames_are_the_right_ones(tmp_path):
    video = tmp_path / "count.mp4"
    write_counting_video(video, count=10, fps=5)
    frames = read_frames(video, 4)
    assert frames.indices == [0, 3, 6, 9]  # linspace(0, 9, 4)
    assert frames.times == pytest.approx([0.0, 0.6, 1.2, 1.8], abs=1e-3)  # index / 5 fps
    assert frames.pixels.shape == (4, 48, 64, 3)
    means = frames.pixels.reshape(4, -1).mean(axis=1)
    assert means == pytest.approx([0, 60, 120, 180], abs=3)


@needs_assets
def test_real_video_sampling():
    frames = read_frames(asset("videos/videollava_sample_demo_1.mp4"), 8)  # 243 frames at 25 fps
    assert frames.indices == [0, 34, 69, 103, 138, 172, 207, 242]
    assert frames.times == pytest.approx([i / 25 for i in frames.indices], abs=1e-3)
    assert frames.pixels.shape == (8, 360, 640, 3) and frames.pixels.dtype == np.uint8


@needs_assets
@pytest.mark.parametrize(
    "name, decodable, shape",
    [
        ("decord_flipping_a_pancake.mkv", 310, (240, 426, 3)),  # header reports 0 frames
        ("edge_cases/decord_video_90.mov", 3, (568, 320, 3)),  # rotation metadata applied
        ("edge_cases/decord_video_270.mov", 3, (568, 320, 3)),
        ("edge_cases/decord_unordered.mov", 4, (50, 50, 3)),  # timestamps out of order
        ("edge_cases/decord_corrupted.mp4", 28, (720, 1280, 3)),  # header says 50, 28 decode
        ("videollava_sample_demo_22.mp4", 1090, (360, 204, 3)),  # portrait
    ],
)
def test_awkward_videos_are_sampled_over_what_decodes(name, decodable, shape):
    frames = read_frames(asset(f"videos/{name}"), 8)
    # The corrupted file's damaged packet stops FFmpeg at frame 28, on rare runs at 27: both are what decodes.
    candidates = [frame_indices(n, 8) for n in (decodable, decodable - 1)] if "corrupted" in name else [
        frame_indices(decodable, 8)]
    assert frames.indices in candidates
    assert frames.pixels.shape == (8, *shape)


@needs_assets
def test_truncated_video_is_an_error(tmp_path):
    broken = tmp_path / "truncated.mp4"
    broken.write_bytes(asset("videos/videollava_sample_demo_1.mp4").read_bytes()[:30000])
    with pytest.raises(VideoQAError, match="not a readable video|corrupted"):
        read_frames(broken, 8)


def test_decoder_log_noise_is_silenced(tmp_path, capfd):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    with pytest.raises(VideoQAError):
        read_frames(junk, 8)
    assert capfd.readouterr().err == ""


def pyav_frames(path: Path) -> list:
    """Every frame of the video, in order, as PyAV decodes it sequentially (no seeking): the reference."""
    import av

    with av.open(str(path)) as container:
        return [(frame.to_ndarray(format="rgb24"), frame.rotation) for frame in container.decode(video=0)]


def clip_reference(images: list, size: int = 224) -> np.ndarray:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images, return_tensors="np").pixel_values


@needs_assets
@pytest.mark.parametrize("name, rotation, shape", [("decord_video_90.mov", -90, (568, 320, 3)),
                                                   ("decord_video_180.mov", -180, (320, 568, 3)),
                                                   ("decord_video_270.mov", 90, (568, 320, 3))])
def test_rotated_videos_are_read_upright(name, rotation, shape):
    """The frames are turned as the display matrix says (PyAV's `frame.rotation`: degrees counter-clockwise), so the
    tower sees what a player shows: the portrait videos come portrait."""
    from PIL import Image

    from videoqa.pixels import clip_pixels

    stored = pyav_frames(asset(f"videos/edge_cases/{name}"))
    assert {turn for _, turn in stored} == {rotation} and stored[0][0].shape == (320, 568, 3)  # stored landscape
    upright = [np.rot90(pixels, rotation // 90) for pixels, _ in stored]
    frames = read_frames(asset(f"videos/edge_cases/{name}"), 3)
    assert frames.pixels.shape == (3, *shape)
    assert all(np.array_equal(ours, theirs) for ours, theirs in zip(frames.pixels, upright))
    ours = clip_pixels(frames.pixels, 224)
    assert np.array_equal(ours, clip_reference([Image.fromarray(np.ascontiguousarray(f)) for f in upright]))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_to_images(tmp_path, orientation):
    """A photo stored turned, with the EXIF tag that says how to turn it back (3: 180°, 6: 90° clockwise, 8: 90°
    counter-clockwise), reads as the upright picture; its CLIP pixels equal those of transformers' `load_image`."""
    from PIL import Image
    from transformers.image_utils import load_image

    from videoqa.frames import read_image
    from videoqa.pixels import clip_pixels

    upright = np.zeros((64, 96, 3), np.uint8)  # landscape: white on the left third, red along the top
    upright[:, :32] = 255
    upright[:8, :, 0] = 255
    stored = np.rot90(upright, {3: 2, 6: 1, 8: -1}[orientation])  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "photo.jpg", quality=100, exif=exif.tobytes())
    image = read_image(tmp_path / "photo.jpg")
    assert image.size == (96, 64)
    assert np.abs(np.asarray(image).astype(int) - upright).mean() < 3  # JPEG's loss only
    reference = clip_reference([load_image(str(tmp_path / "photo.jpg"))])
    assert np.array_equal(clip_pixels([image], 224), reference)


def write_h264(path: Path, seconds: int, keyint: int) -> None:
    """A moving gradient coded with libx264's B-frames (non-reference ones too), a keyframe every `keyint` frames."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(keyint), "keyint_min": str(keyint), "bf": "3"}
        y, x = np.mgrid[0:48, 0:64]
        for i in range(seconds * 25):
            image = ((x + 2 * y + 3 * i) % 256).astype(np.uint8)[..., None].repeat(3, 2)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("start, end", [(None, None), (3.0, 9.0), (17.5, None)])
def test_seeking_finds_the_frames_a_sequential_decode_gives(tmp_path, start, end):
    from videoqa.windows import window

    video = tmp_path / "gop.mp4"
    write_h264(video, seconds=20, keyint=40)
    reference = [pixels for pixels, _ in pyav_frames(video)]
    frames = read_frames(video, 8, window=window(start, end))
    inside = [i for i in range(500) if (start or 0) <= i / 25 < (end or 99)]
    assert frames.indices == [inside[i] for i in frame_indices(len(inside), 8)]
    assert all(np.array_equal(ours, reference[i]) for ours, i in zip(frames.pixels, frames.indices))


@needs_assets
def test_a_truncated_video_is_sampled_over_what_decodes_and_says_so(tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(asset("videos/videollava_sample_demo_1.mp4").read_bytes()[:200_000])  # the header says 243
    decodable = len(pyav_frames_until_damage(cut))
    frames = read_frames(cut, 8)
    assert frames.indices == frame_indices(decodable, 8)
    assert frames.warnings == [f"only {decodable} of 243 frames decode (0.00–{decodable / 25:.2f} s of 9.7 s)"]


def pyav_frames_until_damage(path: Path) -> list:
    import av

    decoded = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(video=0):
                decoded.append(frame)
        except av.FFmpegError:
            pass
    return decoded


@needs_assets
def test_warnings_of_whole_and_damaged_videos():
    assert read_frames(asset("videos/decord_flipping_a_pancake.mkv"), 8).warnings == []  # 310 of ~311 by duration
    damaged = read_frames(asset("videos/edge_cases/decord_corrupted.mp4"), 8)
    assert damaged.warnings in (["only 28 of 50 frames decode (0.00–2.80 s of 5.0 s)"],
                                ["only 27 of 50 frames decode (0.00–2.70 s of 5.0 s)"])
