"""Awkward but valid media, and media that cannot be read: tiny frames, odd names, permissions, pipes, images by
content, huge images. Valid input is answered; the rest is one `error:` line and a documented exit code."""

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


# Widths whose RGB rows FFmpeg pads to a multiple of the width (those dividing the 192 bytes of a row up to 64 px,
# and 96 and 144 px): decord, the decoder before PyAV, reported the padding as extra channels. Heights of 1 and 2
# px, and sizes that were already read right, for contrast.
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
    assert np.array_equal(ours, pil_reference([Image.fromarray(f) for f in frames], size))


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
    """A relative `name:rest` is a protocol to FFmpeg; a name that is not UTF-8 cannot pass through PyAV."""
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
def test_unreadable_video(tmp_path, how, tiny_model):
    prefix = without_permission_checks_bypassed()
    path = unreadable(tmp_path, how)
    try:
        captioned = run_python("-m", "videoqa", "caption", asset(VIDEO), path, "-m", tiny_model, "-n", 2, prefix=prefix)
        records = [json.loads(line) for line in captioned.out.splitlines()]
        assert captioned.code == Exit.SOME_FAILED and [r["error"] is None for r in records] == [True, False]
        assert records[1]["error"] == f"{path}: cannot be read: permission denied"
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


# --- images told by their content ---

def ask_json(cli, path: Path, model: Path) -> dict:
    result = cli("ask", path, QUESTION, "-m", model, "-n", 4, "--json")
    assert result.code == 0, result
    return json.loads(result.out)


@needs_assets
@pytest.mark.parametrize("name, fmt", [("photo.tif", "TIFF"), ("photo.tiff", "TIFF"), ("photo.jpg.mp4", "PNG"),
                                       ("photo", "PNG"), ("photo.dat", "BMP")])
def test_images_are_told_by_their_content(cli, tiny_model, tmp_path, name, fmt):
    """Saved losslessly from the same pixels as photo.png, each is answered as that image is."""
    from PIL import Image

    picture = Image.open(asset("images/videollava_waterview.jpg")).convert("RGB")
    picture.save(tmp_path / "photo.png")
    picture.save(tmp_path / name, format=fmt)
    assert is_image(tmp_path / name)
    record = ask_json(cli, tmp_path / name, tiny_model)
    assert record["prompt"] == f"USER: <image>\n{QUESTION} ASSISTANT:" and record["frames"] == []
    assert record["tokens"] == ask_json(cli, tmp_path / "photo.png", tiny_model)["tokens"]


@needs_assets
def test_a_jpeg_renamed_mp4_is_answered_as_an_image(cli, tiny_model, tmp_path):
    path = tmp_path / "input.jpg.mp4"  # the file tests/test_errors.py once expected exit 3 for
    shutil.copy(asset("images/videollava_desert.jpg"), path)
    assert ask_json(cli, path, tiny_model)["prompt"].startswith("USER: <image>")


@needs_assets
def test_an_animated_gif_stays_an_image(cli, tiny_model, tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (64, 48), (60 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100)
    assert ask_json(cli, tmp_path / "moving.gif", tiny_model)["frames"] == []


def test_is_image_reads_no_more_than_it_can(tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture\n")
    os.mkfifo(tmp_path / "pipe")
    assert not is_image(tmp_path / "missing.bin")
    assert not is_image(tmp_path / "notes.txt")
    assert not is_image(tmp_path / "pipe")  # not opened: a pipe with no writer would block
    assert not is_image(tmp_path / f"{LONG_NAME}.bin")
    assert is_image(tmp_path / "missing.jpg")  # a known image suffix is enough, as before


@needs_assets
@pytest.mark.parametrize("name", ["notes.mp4", "notes"])
def test_neither_video_nor_image(cli, tiny_model, tmp_path, name):
    (tmp_path / name).write_text("this is not a video\n" * 100)
    result = cli("ask", tmp_path / name, QUESTION, "-m", tiny_model)
    assert_clean_failure(result, Exit.INPUT, name, "not a readable video or image")


# --- huge images and Pillow's warnings ---

def huge_png(path: Path, side: int, mode: str) -> Path:
    """A side x side PNG that compresses to little: a disc, in 1-bit or palette mode."""
    from PIL import Image, ImageDraw

    image = Image.new(mode, (side, side), 0)
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 200, 0])
    ImageDraw.Draw(image).ellipse((side // 8, side // 8, side * 7 // 8, side * 7 // 8), fill=1)
    image.save(path, compress_level=1)
    return path


@needs_assets
@pytest.mark.parametrize("side, mode", [(10000, "P"), (14000, "1")])  # 100 megapixels (Pillow warns), 196 (refuses)
def test_huge_image_is_answered(cli, tiny_model, tmp_path, side, mode):
    """No warning may be raised (pytest would hide one that a real process prints on stderr): all are recorded."""
    import warnings

    path = huge_png(tmp_path / "huge.png", side, mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli("ask", path, QUESTION, "-m", tiny_model, "-n", 2, "--json")
    assert result.code == 0, result
    assert json.loads(result.out)["prompt"].startswith("USER: <image>") and result.err == ""
    assert [str(w.message) for w in caught] == []


def png_header(path: Path, width: int, height: int) -> Path:
    """Only a PNG's signature and IHDR (8-bit grey) and the start of its data: all a size check reads."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)))
    return path


@needs_assets
def test_image_past_the_cap_is_refused(cli, tiny_model, tmp_path):
    path = png_header(tmp_path / "bomb.png", 20000, 20000)
    assert_clean_failure(cli("ask", path, QUESTION, "-m", tiny_model), Exit.INPUT, "bomb.png", "20000 x 20000", "268 megapixels")
    assert is_image(path) and is_image(png_header(tmp_path / "bomb", 20000, 20000))


@needs_assets
@pytest.mark.parametrize("name", ["large.bmp", "large.jpg"])
def test_large_images_are_shrunk_without_changing_what_the_tower_sees(tmp_path, name):
    """6200 px a side: halved before the tower's resize (a box average; JPEG: decoded at half scale). The tower's
    pixels stay within two grey levels of transformers' on the full image (2 / 255 / CLIP std = 0.03)."""
    from PIL import Image

    full = Image.open(asset("images/videollava_waterview.jpg")).convert("RGB").resize((6200, 6200), Image.BICUBIC)
    full.save(tmp_path / name, quality=95)
    ours = read_image(tmp_path / name)
    assert ours.size == (3100, 3100)
    with Image.open(tmp_path / name) as original:
        reference = pil_reference([original], 336)
    assert np.abs(clip_pixels([ours], 336) - reference).max() < 0.035


@pytest.mark.parametrize("size", [224, 336])
def test_transparency_is_composited_onto_white_as_transformers_does(tmp_path, size):
    """A palette PNG with a transparent colour: no two-line UserWarning, and transformers' pixels."""
    from PIL import Image

    image = Image.new("P", (40, 30), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.paste(1, (0, 0, 20, 30))
    image.save(tmp_path / "logo.png", transparency=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = clip_pixels([read_image(tmp_path / "logo.png")], size)
    assert caught == []
    with Image.open(tmp_path / "logo.png") as original:
        assert np.array_equal(ours, pil_reference([original], size))
        assert np.abs(clip_pixels([original], size) - ours).max() == 0  # a PIL image given straight to the tower
    white = pil_reference([Image.new("RGB", (1, 1), "white")], size)[0, :, 0, 0]
    assert ours[0, :, 0, -1] == pytest.approx(white)  # the right half is transparent red


# --- pipes ---

def feed(fifo: Path, data: bytes) -> threading.Thread:
    """Write `data` into a FIFO from a thread, as `cat clip.mp4 > fifo &` would."""
    def write():
        with fifo.open("wb") as pipe:
            pipe.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@needs_assets
def test_video_through_a_fifo(cli, tiny_model, tmp_path):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    feed(fifo, asset(VIDEO).read_bytes())
    piped = ask_json(cli, fifo, tiny_model)
    assert piped["video"] == str(fifo)
    assert piped["tokens"] == ask_json(cli, asset(VIDEO), tiny_model)["tokens"]
    assert not list(Path(tempfile.gettempdir()).glob("videoqa-*/clip.mp4"))  # the copy is gone


@needs_assets
def test_chat_about_a_video_through_a_fifo(tiny_model, tmp_path):
    """The session goes on after the copy is gone: the pipe, which cannot be read twice, is not hashed for the cache
    (that would wait for a writer for ever; a real process, so that the timeout can end it)."""
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    feed(fifo, asset(VIDEO).read_bytes())
    done = subprocess.run([sys.executable, "-m", "videoqa", "chat", fifo, "-m", tiny_model, "-n", "2", "--json"],
                          cwd=ROOT, input="What happens?\nWhy?\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["turn"] for line in done.stdout.splitlines()] == [1, 2]


def piped_python(source: Path | None, *args) -> Result:
    """`cat SOURCE | python ARGS...`: stdin a real pipe (empty without a source)."""
    with (source or Path(os.devnull)).open("rb") as data:
        cat = subprocess.Popen(["cat"], stdin=data, stdout=subprocess.PIPE)
        result = run_python(*args, stdin=cat.stdout)
        cat.stdout.close()
        cat.wait()
    return result


@needs_assets
def test_video_piped_to_dev_stdin(tiny_model):
    result = piped_python(asset(VIDEO), "-m", "videoqa", "ask", "/dev/stdin", QUESTION, "-m", tiny_model, "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    assert record["video"] == "/dev/stdin" and len(record["frames"]) == 8


@needs_assets
def test_garbage_piped_to_dev_stdin_names_stdin(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("not a video\n" * 100)
    result = piped_python(tmp_path / "notes.txt", "-m", "videoqa", "ask", "/dev/stdin", QUESTION, "-m", tiny_model)
    assert_clean_failure(result, Exit.INPUT, "/dev/stdin:", "not a readable video or image")


@pytest.mark.parametrize("args", [["ask", "/dev/stdin", "-"], ["ask", "/dev/stdin", "--prompt-file", "/dev/stdin"],
                                  ["chat", "/dev/stdin"]])
def test_video_and_questions_cannot_share_stdin(args):
    assert_clean_failure(piped_python(None, "-m", "videoqa", *args), Exit.USAGE, "/dev/stdin", "stdin")


def test_readers_refuse_a_pipe_they_would_consume(tmp_path):
    os.mkfifo(tmp_path / "clip.mp4")
    for read in (lambda path: read_frames(path, 8), read_image):
        with pytest.raises(VideoQAError, match="is a pipe, not a regular file") as raised:
            read(tmp_path / "clip.mp4")
        assert raised.value.code == Exit.INPUT


@pytest.mark.parametrize("name", ["x[/].mp4", "[red]x[/red].mp4", "[bold]clip.mp4"])
def test_error_lines_show_names_as_they_are(cli, tmp_path, name):
    """Names that look like rich markup: one line naming the file verbatim, not a MarkupError traceback."""
    assert_clean_failure(cli("ask", tmp_path / name, QUESTION), Exit.INPUT, f"{name}: no such file")
