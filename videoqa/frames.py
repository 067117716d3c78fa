"""Stage 1: decode N uniformly spaced RGB frames from a video file with decord, or read a still image with Pillow.

The sampling rule is the one of the original Video-LLaVA training code:
`np.linspace(0, n - 1, N, dtype=int)`, first and last frame included. A video
with fewer than N frames repeats frames by the same rule.

Images are told from videos by their suffix or, failing that, their header. What
cannot be read is refused here, as one VideoQAError(Exit.INPUT) naming the file.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from videoqa.errors import Exit, VideoQAError


@dataclass
class Frames:
    pixels: np.ndarray | None  # (N, H, W, 3) uint8 RGB; None when the features came from the cache
    indices: list[int]  # index of each sampled frame in the video
    times: list[float]  # its presentation time in seconds

    def listed(self) -> list[dict]:
        """Each sampled frame's {"index", "time"}, as records show them."""
        return [{"index": i, "time": t} for i, t in zip(self.indices, self.times)]


def frame_indices(n: int, count: int) -> list[int]:
    """Uniform sample of `count` indices out of `n` frames (training-code rule)."""
    return np.linspace(0, n - 1, count, dtype=int).tolist()


def check_file(path: Path) -> None:
    """Reject what cannot be media before a decoder sees it, in one message that names the file and the problem.

    A decoder would call any of these an unreadable video, and Python's own errors (a name past NAME_MAX, no
    permission) would escape as tracebacks.
    """
    try:
        status = path.stat()
        if stat.S_ISREG(status.st_mode):
            path.open("rb").close()  # the permission to read, which the decoders need
    except FileNotFoundError:
        raise VideoQAError(f"{path}: no such file", Exit.INPUT) from None
    except OSError as e:
        raise VideoQAError(f"{path}: cannot be read: {(e.strerror or str(e)).lower()}", Exit.INPUT) from None
    if stat.S_ISDIR(status.st_mode):
        raise VideoQAError(f"{path}: is a directory, not a video or image file", Exit.INPUT)
    if not stat.S_ISREG(status.st_mode):
        kind = "pipe" if stat.S_ISFIFO(status.st_mode) else "device or socket"
        raise VideoQAError(f"{path}: is a {kind}, not a regular file (decoders need to seek)", Exit.INPUT)
    if status.st_size == 0:
        raise VideoQAError(f"{path}: file is empty", Exit.INPUT)


@contextmanager
def seekable(path: Path | None) -> Iterator[Path | None]:
    """A pipe (`cat clip.mp4 | videoqa ask /dev/stdin ...`, a FIFO, `<(...)`) copied whole to a temporary file, since
    decoders seek; the copy keeps the pipe's name, is deleted afterwards, and errors about it name the pipe.
    Any other path (or None) as it is."""
    if path is None or not _is_pipe(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="videoqa-") as folder:
        copy = Path(folder) / path.name
        _spool(path, copy)
        try:
            yield copy
        except VideoQAError as e:
            raise VideoQAError(str(e).replace(str(copy), str(path)), e.code) from None


def _is_pipe(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(path.stat().st_mode)
    except OSError:  # check_file says what is wrong
        return False


def _spool(pipe: Path, copy: Path) -> None:
    try:
        with pipe.open("rb") as source, copy.open("wb") as target:
            shutil.copyfileobj(source, target, 2**20)
    except OSError as e:  # no permission, or no room in the temporary folder
        raise VideoQAError(f"{pipe}: copying it to {copy.parent} failed: {e.strerror or e}", Exit.INPUT) from None


_fd2 = threading.Lock()  # frames are read on background threads too; one redirection at a time
_damaged = threading.Lock()  # where decoding of damaged data stops varies if two decoders run at once


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """decord's C++ logger writes to fd 2 whatever its level; point fd 2 at /dev/null meanwhile."""
    with _fd2:
        sys.stderr.flush()
        saved = os.dup(2)
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def _decoder_name(path: Path) -> Iterator[str]:
    """The path as decord can open it: absolute, since FFmpeg reads a relative `name:rest` as the protocol `name`
    (`http:`, `concat:`); a name that is not UTF-8, which decord cannot pass on, through a symlink."""
    absolute = os.path.abspath(path)
    try:
        absolute.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8, held by Python as surrogates
        with tempfile.TemporaryDirectory(prefix="videoqa-") as folder:
            os.symlink(absolute, os.path.join(folder, "video"))
            yield os.path.join(folder, "video")
        return
    yield absolute


def _open(path: Path, threads: int = 0):
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own log lines would flood stderr
    try:
        with _stderr_silenced(), _decoder_name(path) as name:
            return decord.VideoReader(name, ctx=decord.cpu(0), num_threads=threads)
    except Exception:
        raise VideoQAError(f"{path}: not a readable video or image (no decodable video stream, no image format "
                           "Pillow knows)", Exit.INPUT) from None


def open_video(path: Path, threads: int = 0):
    """A reader over the video, or the error that it is not one. A file that is not a video fails at its header, at
    once; a video is read through (decord indexes its packets) but no frame is decoded. So this comes before hashing
    a file for the feature cache: a 20 GB file that is not a video is refused without being read."""
    check_file(path)
    return _open(path, threads)


def _decodable_count(path: Path) -> int:
    """Frames a broken or header-less container really yields: decode until the first failure.

    One decoder thread: with several, where damaged data stops decoding varies from run to run.
    """
    reader = _open(path, threads=1)
    count = 0
    while True:
        try:
            reader.next()
        except Exception:  # StopIteration at the end, DECORDError at the damage
            return count
        count += 1


def _unpadded(frame: np.ndarray) -> np.ndarray:
    """The real (H, W, 3) pixels of a frame whose RGB rows FFmpeg padded for alignment.

    When the padded row (`linesize`) is a multiple of the width, decord hands the frame over without copying, shaped
    (H, W, linesize / W): the padding shows as extra channels (rows up to 64 px take 192 bytes, which 1-4, 6, 8, 12,
    16, 24, 32 and 48 px divide; 96 and 144 px rows take 4 bytes a pixel). Keep the 3 W bytes of each row that are
    pixels; other frames arrive as (H, W, 3) already.
    """
    height, width, channels = frame.shape
    if channels == 3:
        return frame
    return frame.reshape(height, width * channels)[:, : width * 3].reshape(height, width, 3)


def _sample(reader, indices: list[int]) -> np.ndarray | None:
    """The frames at `indices`, or None where the video is damaged.

    decord's batch copy refuses frames with padded rows (see `_unpadded`); those are read one by one instead.
    """
    try:
        return reader.get_batch(indices).asnumpy()
    except Exception:
        pass
    try:
        if reader[indices[0]].shape[2] == 3:
            return None  # the batch failed on damaged data, not on padded rows
        return np.stack([_unpadded(reader[i].asnumpy()) for i in indices])
    except Exception:
        return None


def _decode_prefix(path: Path, count: int, n: int) -> tuple[list[int], np.ndarray | None]:
    """Sample `count` of the first `n` frames, decoding in order; if the damage comes earlier this time, sample less."""
    while n > 0:
        indices = frame_indices(n, count)
        reader = _open(path, threads=1)
        kept, i = {}, 0
        try:
            for i in range(indices[-1] + 1):
                frame = _unpadded(reader.next().asnumpy())
                if i in indices:
                    kept[i] = frame
            return indices, np.stack([kept[i] for i in indices])
        except Exception:  # the decoder gave up at frame i this time: damaged data is not always read alike
            n = i
    return [], None


def _times(reader, indices: list[int]) -> list[float]:
    try:
        return [round(float(t), 3) for t in reader.get_frame_timestamp(indices)[:, 0]]
    except Exception:  # containers without a frame index: fall back to the average rate
        fps = reader.get_avg_fps() or 1.0
        return [round(i / fps, 3) for i in indices]


def read_frames(path: Path, count: int, reader=None, *, threads: int = 0) -> Frames:
    """Sample `count` frames; damaged videos are sampled over the part that decodes. `reader`: the video's, from
    `open_video`, when the caller opened it already (opening reads the whole file)."""
    reader = open_video(path, threads) if reader is None else reader
    n = len(reader)
    indices = frame_indices(n, count) if n > 0 else []
    pixels = _sample(reader, indices) if indices else None
    if pixels is None:
        with _damaged:
            indices, pixels = _decode_prefix(path, count, _decodable_count(path))
        if pixels is None:
            raise VideoQAError(f"{path}: video is corrupted or truncated, no frame decodes", Exit.INPUT)
    return Frames(pixels=pixels, indices=indices, times=_times(reader, indices))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Pillow formats that make a file an image whatever its name: formats with a signature, so no video is taken for one
# (not TGA, which has none, nor MPEG, a video stream Pillow can size but not decode).
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "JPEG2000", "ICO", "PPM")
MAX_IMAGE_PIXELS = 2**28  # 268 megapixels (16384 x 16384), about 800 MB as RGB; Pillow's own guard stops at 179
KEEP_SIDE = 3072  # huge images are shrunk while both sides stay this long: 3x the largest AnyRes canvas side, 1008 px
_pillow = threading.Lock()  # Pillow's guard and Python's warning filters are process-wide


@contextmanager
def _pillow_reading() -> Iterator[None]:
    """Pillow as we read images: its decompression-bomb guard (a warning past 89 megapixels, an error past 179)
    lifted, MAX_IMAGE_PIXELS being checked instead with a message that says so; its warnings about a file (odd
    EXIF, palette transparency) kept off stderr, since the image is read as well as it can be either way."""
    from PIL import Image

    with _pillow, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _has_alpha(image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def rgb(image):
    """A Pillow image as RGB, transparency composited onto white as transformers' `convert_to_rgb` does (a plain
    `convert("RGB")` shows the colours under transparent pixels, and warns for a palette with transparency)."""
    from PIL import Image

    if not _has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _decoded(image):
    """The image decoded as RGB, or RGBA with transparency; one at least twice KEEP_SIDE on both sides shrunk by the
    largest whole factor that keeps both at KEEP_SIDE or more: JPEGs decoded at 1/2 to 1/8 scale (`draft`), others
    box-averaged (`reduce`). The towers resize to 224-1008 px anyway, and from 3x the final size a bicubic resize of
    the shrunk image matches one of the original within a grey level or two (Pillow's `reducing_gap`): the
    shrinking saves memory and time, not pixels."""
    mode = "RGBA" if _has_alpha(image) else "RGB"
    if min(image.size) < 2 * KEEP_SIDE:
        return image.convert(mode)
    image.draft(mode, (KEEP_SIDE, KEEP_SIDE))
    image = image.convert(mode)
    factor = min(image.size) // KEEP_SIDE
    return image.reduce(factor) if factor > 1 else image


def read_image(path: Path):
    """A still image as RGB, for the image tower; Pillow reads it fully now so a broken file fails here."""
    from PIL import Image

    check_file(path)
    try:
        with _pillow_reading(), Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise VideoQAError(f"{path}: a {width} x {height} image, past the {MAX_IMAGE_PIXELS // 10**6} "
                                   "megapixels videoqa reads (a guard against decompression bombs)", Exit.INPUT)
            return rgb(_decoded(image))
    except VideoQAError:
        raise
    except Exception:
        raise VideoQAError(f"{path}: not a readable image", Exit.INPUT) from None


def is_image(path: Path) -> bool:
    """An image by its suffix (`.jpg`, `.png`, ...) or, under any other name, by its content: Pillow identifies
    the format from the header without decoding. What cannot be opened (missing, a pipe, ...) is not an image."""
    from PIL import Image

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False  # reading a pipe's header would take it from the decoder
        with _pillow_reading(), Image.open(path, formats=IMAGE_FORMATS):
            return True
    except Exception:  # OSError, or Pillow's errors for what is no image of these formats
        return False


def read_media(path: Path, frames: int, reader=None):
    """Images are read with Pillow, everything else as a video (with `reader`, if it is open already)."""
    return read_image(path) if is_image(path) else read_frames(path, frames, reader)
