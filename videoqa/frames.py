"""Stage 1: decode N uniformly spaced RGB frames from a video file with decord.

The sampling rule is the one of the original Video-LLaVA training code:
`np.linspace(0, n - 1, N, dtype=int)`, first and last frame included. A video
with fewer than N frames repeats frames by the same rule.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import threading
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
        raise VideoQAError(f"{path}: not a readable video (no decodable video stream)", Exit.INPUT) from None


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
    (H, W, linesize / W): the padding shows as extra channels (widths 1 to 48 px have 192-byte rows, 96 and 144 px
    4 bytes a pixel). Keep the 3 W bytes of each row that are pixels; other frames arrive as (H, W, 3) already.
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


def read_frames(path: Path, count: int) -> Frames:
    """Sample `count` frames; damaged videos are sampled over the part that decodes."""
    check_file(path)
    reader = _open(path)
    n = len(reader)
    indices = frame_indices(n, count) if n > 0 else []
    pixels = _sample(reader, indices) if indices else None
    if pixels is None:
        with _damaged:
            indices, pixels = _decode_prefix(path, count, _decodable_count(path))
        if pixels is None:
            raise VideoQAError(f"{path}: video is corrupted or truncated, no frame decodes", Exit.INPUT)
    return Frames(pixels=pixels, indices=indices, times=_times(reader, indices))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def read_image(path: Path):
    """A still image, for the image tower; PIL reads it fully now so a broken file fails here."""
    from PIL import Image

    check_file(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception:
        raise VideoQAError(f"{path}: not a readable image", Exit.INPUT) from None


def is_image(path: Path) -> bool:
    """Images are told from videos by their suffix."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_media(path: Path, frames: int):
    """Images are read with Pillow, everything else as a video."""
    return read_image(path) if is_image(path) else read_frames(path, frames)
