"""Awkward but valid media, and media that cannot be read: tiny frames, odd names, permissions, pipes, images by
content, huge images. Valid input is answered; the rest is one `error:` line and exit code 3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import Result, assert_clean_failure, asset, needs_assets
from videoqa.errors import Exit, VideoQAError
from videoqa.frames import frame_indices, is_image, read_frames, read_image, read_media
from videoqa.pixels import clip_pixels

QUESTION = "What happens?"
VIDEO = "videos/videollava_sample_demo_1.mp4"
ROOT = Path(__file__).resolve().parents[1]  # `python -m videoqa` from here runs this checkout


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


# --- names and permissions: exit 3 from ask, VideoQAError(Exit.INPUT) from the readers (caption records it) ---

LONG_NAME = "v" * 300  # past NAME_MAX (255 bytes on Linux and macOS)


def test_name_longer_than_name_max(cli, tmp_path):
    result = cli("ask", tmp_path / f"{LONG_NAME}.mp4", QUESTION)
    assert_clean_failure(result, Exit.INPUT, LONG_NAME, "file name too long")


@pytest.mark.parametrize("read", [lambda path: read_frames(path, 8), read_image, lambda path: read_media(path, 8)])
@pytest.mark.parametrize("suffix", [".mp4", ".jpg"])
def test_readers_refuse_a_name_longer_than_name_max(tmp_path, read, suffix):
    with pytest.raises(VideoQAError, match="file name too long") as raised:
        read(tmp_path / f"{LONG_NAME}{suffix}")
    assert raised.value.code == Exit.INPUT


@needs_assets
@pytest.mark.parametrize("name", ["a:b.mp4", "http:clip.mp4", "concat:clip.mp4", b"latin1-\xe9t\xe9.mp4"])
def test_names_ffmpeg_misreads_are_read(cli, tiny_model, tmp_path, monkeypatch, name):
    """A relative `name:rest` is a protocol to FFmpeg; a name that is not UTF-8 cannot pass through decord."""
    monkeypatch.chdir(tmp_path)
    path = Path(os.fsdecode(name))
    shutil.copy(asset(VIDEO), path)
    assert len(read_frames(path, 8).indices) == 8
    result = cli("ask", path, QUESTION, "-m", tiny_model, "-n", 2)
    assert result.code == 0 and result.out.strip(), result


def without_permission_checks_bypassed() -> list[str]:
    """A command prefix under which file permissions apply: nothing for a user; for root, setpriv dropping the two
    capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so the real condition is tested."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and without setpriv root reads any file")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, and setpriv may not drop capabilities here (no CAP_SETPCAP)")
    return prefix


def unreadable(tmp_path: Path, how: str) -> Path:
    """A real video this process may not read: the file itself mode 000, or a file in a folder mode 000."""
    if how == "file":
        path = tmp_path / "denied.mp4"
        shutil.copy(asset(VIDEO), path)
        path.chmod(0)
    else:
        (tmp_path / "locked").mkdir()
        path = tmp_path / "locked" / "clip.mp4"
        shutil.copy(asset(VIDEO), path)
        path.parent.chmod(0)
    return path


def run_python(*args, prefix: list[str] = (), stdin=None) -> Result:
    """`python ARGS...` in a real process, from the checkout so that `-m videoqa` runs its CLI; `prefix` (as from
    `without_permission_checks_bypassed`) goes before `python`."""
    done = subprocess.run([*prefix, sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          stdin=stdin, timeout=300)
    return Result(done.returncode, done.stdout, done.stderr)


@needs_assets
@pytest.mark.parametrize("how", ["file", "folder"])
def test_unreadable_video(tmp_path, how):
    prefix = without_permission_checks_bypassed()
    path = unreadable(tmp_path, how)
    try:
        assert_clean_failure(run_python("-m", "videoqa", "ask", path, QUESTION, prefix=prefix), Exit.INPUT,
                             str(path), "permission denied")
        script = ("import sys; from pathlib import Path; from videoqa.frames import read_frames, read_image\n"
                  "for read in (lambda p: read_frames(p, 8), read_image):\n"
                  "    try: read(Path(sys.argv[1]))\n"
                  "    except Exception as e: print(type(e).__name__, int(getattr(e, 'code', 1)), e)\n")
        lines = run_python("-c", script, path, prefix=prefix).out.splitlines()
        assert lines == [f"VideoQAError 3 {path}: cannot be read: permission denied"] * 2
    finally:
        path.parent.chmod(0o755) if how == "folder" else path.chmod(0o644)
