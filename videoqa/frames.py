"""Stage 1: decode sampled RGB frames from a video file with PyAV (FFmpeg), or read a still image with Pillow.

A count N of frames is sampled by the rule of the original Video-LLaVA training code:
`np.linspace(0, n - 1, N, dtype=int)`, first and last frame included, over the frames of the video or of a time
window of it; a video with fewer than N frames repeats frames by the same rule. By time (`ByTime`, `--fps`), a
window of s seconds takes int(s x fps) frames within its caps, by `np.linspace(0, n - 1, N).round()`, as
transformers' Qwen3-VL video processor samples.

Frames are found by seeking to the keyframe before them and decoding forward to their presentation timestamp, so
sampling a long video decodes a few keyframe intervals, not the file. (decord, used before, returned wrong frames
after seeking in long H.264 files: it skipped fewer frames than asked.) Frames and images come upright: video
frames turned by their rotation metadata, images by their EXIF orientation.

Images are told from videos by their suffix or, failing that, their header. What
cannot be read is refused here, as one VideoQAError(Exit.INPUT) naming the file.
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import stat
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from videoqa.errors import Exit, VideoQAError
from videoqa.windows import WHOLE, Window


@dataclass(frozen=True)
class ByTime:
    """`--fps`: `fps` frames a second of the window, at least `least` and at most `most` (its reason `why`), as
    transformers' Qwen3-VL video processor samples: int(seconds x fps) frames, clamped, spread by
    np.linspace(0, n - 1, N).round()."""

    fps: float
    most: int
    why: str = "--max-frames"  # what set `most`: --max-frames, the model's context or the memory free
    least: int = 1

    def wanted(self, seconds: float) -> int:
        return max(int(seconds * self.fps), self.least)

    def indices(self, available: int, seconds: float) -> list[int]:
        count = min(self.wanted(seconds), self.most, available)
        return np.linspace(0, available - 1, count).round().astype(int).tolist()

    def capped(self, available: int, seconds: float) -> list[str]:
        """The note that the cap cut the rate, if it did (and not the video's own frame rate)."""
        wanted = self.wanted(seconds)
        if wanted <= self.most or available <= self.most:
            return []
        return [f"--fps {self.fps:g}: {seconds:.1f} s would take {wanted} frames; {self.why} allows {self.most}, "
                f"so they are {self.most / seconds:.3g} a second"]

    def __str__(self) -> str:  # the feature cache's key
        return f"fps={self.fps!r},most={self.most},least={self.least}"


Rule = int | ByTime  # how frames are chosen: a count spread uniformly (--frames), or by time (--fps)
Sampler = Callable[[tuple[int, int]], Rule]  # a video's rule from its frames' (height, width): caps by tokens need it


@dataclass
class Frames:
    pixels: np.ndarray | None  # (N, H, W, 3) uint8 RGB; None when the features came from the cache
    indices: list[int]  # index of each sampled frame in the whole video
    times: list[float]  # its presentation time in seconds, from the video's start
    warnings: list[str] = field(default_factory=list)  # e.g. that only part of the video decodes
    window: Window = WHOLE  # the part of the video the frames were sampled from
    rule: Rule | None = None  # what chose them (None: a count, the number of indices)

    def listed(self) -> list[dict]:
        """Each sampled frame's {"index", "time"}, as records show them."""
        return [{"index": i, "time": t} for i, t in zip(self.indices, self.times)]


def frame_indices(n: int, count: int) -> list[int]:
    """Uniform sample of `count` indices out of `n` frames (training-code rule)."""
    return np.linspace(0, n - 1, count, dtype=int).tolist()


def pick(rule: Rule, available: int, seconds: float) -> list[int]:
    """Which of `available` frames, covering `seconds`, a rule samples."""
    return rule.indices(available, seconds) if isinstance(rule, ByTime) else frame_indices(available, rule)


URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:)/+(?=[^/])")  # https://host/clip.mp4, s3://bucket/clip.mp4


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
        if URL.match(str(path)):  # Path has folded the scheme's "//" into one slash
            url = URL.sub(r"\1//", str(path), count=1)
            raise VideoQAError(f"{url}: URLs are not read; download the file first", Exit.INPUT) from None
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


@contextmanager
def _decoder_name(path: Path) -> Iterator[str]:
    """The path as FFmpeg can open it: absolute, since FFmpeg reads a relative `name:rest` as the protocol `name`
    (`http:`, `concat:`); a name that is not UTF-8, which PyAV cannot pass on, through a symlink."""
    absolute = os.path.abspath(path)
    try:
        absolute.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8, held by Python as surrogates
        with tempfile.TemporaryDirectory(prefix="videoqa-") as folder:
            os.symlink(absolute, os.path.join(folder, "video"))
            yield os.path.join(folder, "video")
        return
    yield absolute


def _container(path: Path):
    """The file opened by FFmpeg (its header read, nothing decoded), with a video stream, or the error that it is no
    video."""
    import av

    try:
        with _decoder_name(path) as name:
            container = av.open(name, metadata_errors="replace")
    except Exception:
        container = None
    if container is None or not container.streams.video:
        if container is not None:
            container.close()
        raise VideoQAError(f"{path}: not a readable video or image (no decodable video stream, no image format "
                           "Pillow knows)", Exit.INPUT)
    return container


@dataclass(frozen=True)
class Index:
    """A video's frames as its packets list them, read without decoding a frame."""

    pts: list[int]  # each frame's presentation timestamp in the stream's time base, in presentation order
    times: list[float]  # the same in seconds from the stream's start
    keys: list[int]  # positions (in that order) of the keyframes, where decoding can start; 0 always
    end: float  # seconds: where the last frame ends
    declared: int  # frames the header announces (from its duration where it gives no count)
    length: float  # seconds the header announces
    seekable: bool  # every packet has a timestamp, so a frame can be found by seeking

    def span(self, inside: list[int]) -> float:
        """Seconds the frames at `inside` (consecutive positions) cover: from the first's start to the next frame's
        (or the video's end)."""
        after = inside[-1] + 1
        return (self.times[after] if after < len(self.times) else self.end) - self.times[inside[0]]

    @property
    def truncated(self) -> bool:
        """Whether the file holds fewer frames than its header announces (headers round: one short is no damage)."""
        return self.declared - len(self.pts) >= 2


def _packets(container, stream) -> list[tuple[int | None, bool]]:
    """(timestamp, keyframe) of each video packet; the file is read through, up to its damage if it has one."""
    found = []
    try:
        for packet in container.demux(stream):
            if packet.size:
                found.append((packet.pts if packet.pts is not None else packet.dts, packet.is_keyframe))
    except Exception:  # damaged data: the packets before it are the index
        pass
    return found


def _index(path: Path, container, stream) -> Index:
    packets = _packets(container, stream)
    if not packets:
        raise VideoQAError(f"{path}: video is corrupted or truncated, no frame decodes", Exit.INPUT)
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    seekable = all(pts is not None for pts, _ in packets)
    ordered = sorted(packets) if seekable else [(i, key) for i, (_, key) in enumerate(packets)]
    pts = [stamp for stamp, _ in ordered]
    base, unit = (stream.start_time or 0, float(stream.time_base)) if seekable else (0, 1 / rate)
    times = [(stamp - base) * unit for stamp in pts]
    end = round(times[-1] + 1 / rate, 6)  # 9.68 + 0.04 is 9.719999999999999 in floats
    length = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6 or end
    declared = stream.frames or round(length * rate)
    keys = sorted({0, *(i for i, (_, key) in enumerate(ordered) if key)})
    return Index(pts, times, keys, end, declared, length, seekable)


class Damaged(Exception):
    """A frame did not decode: the data is damaged or missing."""


def upright(frame) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB, turned as its display matrix says (phones record portrait video as
    landscape frames with a rotation), so the model sees what a player shows."""
    pixels = frame.to_ndarray(format="rgb24")
    turns = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels


class Video:
    """An open video file: its frame index, built on first need from the packets (the file is read through, no frame
    decoded), and one decoder that moves forward through the file. It seeks to the keyframe before a wanted frame
    only where that skips frames it would otherwise decode: a few frames of an hour of video cost a few keyframe
    intervals of decoding, and consecutive windows are read in one forward pass. Frames are found by their
    presentation timestamps, so every frame is the one the index names."""

    def __init__(self, path: Path, threads: int = 0):
        self.path, self.container = path, _container(path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame and slice threads
        self.stream.thread_count = threads  # 0: FFmpeg's choice
        self.next: int | None = None  # the position of the frame the decoder gives next; None: seek first
        self.decoded: Iterator | None = None
        self._index: Index | None = None
        self.counted: int | None = None  # frames that decode, as far as known (see `decodable`)
        self.recounted = False  # whether they were counted from the start, after a frame failed to decode

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (it must not be read afterwards: PyAV does not check)."""
        self.container.close()

    @property
    def size(self) -> tuple[int, int]:
        """The frames' (height, width) as coded (a quarter turn swaps them, which changes no token count)."""
        return self.stream.codec_context.height, self.stream.codec_context.width

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = _index(self.path, self.container, self.stream)
        return self._index

    def decode(self, positions: list[int]) -> np.ndarray:
        """The upright frames at `positions` (ascending, repeats allowed), (N, H, W, 3) uint8; Damaged if one
        does not decode."""
        if not self.index.seekable:
            raise Damaged  # without timestamps only decoding in order tells the frames apart
        frames = {position: self._frame_at(position) for position in sorted(set(positions))}
        return np.stack([frames[position] for position in positions])

    def _frame_at(self, target: int) -> np.ndarray:
        index = self.index
        key = index.keys[bisect.bisect_right(index.keys, target) - 1]
        if self.next is None or target < self.next or key > self.next:  # seeking skips frames: seek
            self.container.seek(index.pts[key], stream=self.stream, backward=True)
            self.decoded = self.container.decode(self.stream)
        self.next, wanted = None, index.pts[target]
        try:
            frame = next(f for f in self.decoded if f.pts is not None and f.pts >= wanted)
        except Exception:  # the end of the data (StopIteration) or damage (FFmpeg's errors)
            raise Damaged from None
        if frame.pts != wanted:
            raise Damaged  # the decoder skipped the frame
        self.next = target + 1
        return upright(frame)

    def in_order(self) -> Iterator:
        """Every frame from where the container stands (the first, in a fresh one), in order, until the end or the
        first that does not decode."""
        try:
            yield from self.container.decode(self.stream)
        except Exception:  # FFmpeg's errors at damaged data
            return

    def sample(self, rule: Rule, window: Window = WHOLE) -> Frames:
        """Frames chosen by `rule` among those inside `window` (a count spread evenly, the training-code rule; or by
        time), found by seeking; a damaged video is sampled over the part that decodes, and says so in the frames'
        warnings, as a cap that cut --fps's rate does."""
        index = self.index
        length = max(index.end, index.length) if index.truncated else index.end
        if index.end <= window.start < length:  # in a truncated file, past its data but not the length it announces
            _no_frame(self.path, window, _partial(index, self.decodable(damaged=False)))
        inside = window.positions(index.times, length)
        seconds = index.span(inside)
        try:
            chosen = [inside[i] for i in pick(rule, len(inside), seconds)]
            pixels = self.decode(chosen)
            decodable = self.decodable(damaged=False)
        except Damaged:
            decodable = self.decodable(damaged=True)
            inside = [i for i in inside if i < decodable]
            seconds = index.span(inside) if inside else 0.0
            chosen, pixels = _sample_in_order(self.path, inside, rule, seconds)
            if pixels is None:
                _no_frame(self.path, window, _partial(index, decodable))
        times = [round(index.times[i], 3) for i in chosen]
        capped = rule.capped(len(inside), seconds) if isinstance(rule, ByTime) else []
        return Frames(pixels=pixels, indices=chosen, times=times, warnings=[*_partial(index, decodable), *capped],
                      window=window, rule=rule)

    def decodable(self, damaged: bool) -> int:
        """How many frames decode, found once for every window: all that the index lists, or, in a file shorter
        than its header says (truncated), those up to where decoding its last keyframe interval stops; after a frame
        failed to decode (`damaged`), those that decode in order from the start."""
        if damaged and not self.recounted:
            self.counted, self.recounted = _decodable(self.path), True
        elif self.counted is None:
            self.counted = self._tail()
        return self.counted

    def _tail(self) -> int:
        index = self.index
        if not index.truncated or not index.seekable:
            return len(index.pts)
        key, self.next = index.keys[-1], None  # the decoder is left where this stops: seek for the next frame
        self.container.seek(index.pts[key], stream=self.stream, backward=True)
        return key + sum(1 for frame in self.in_order() if frame.pts is not None and frame.pts >= index.pts[key])


def _decodable(path: Path) -> int:
    """Frames a damaged video really yields: decode in order until the first failure (one decoder thread: with
    several, where damaged data stops decoding can vary)."""
    with Video(path, threads=1) as video:
        return sum(1 for _ in video.in_order())


def _sample_in_order(path: Path, inside: list[int], rule: Rule,
                     seconds: float) -> tuple[list[int], np.ndarray | None]:
    """Sample the frames at `inside` (positions, covering `seconds`) by `rule`, decoding in order from the start; if
    the damage comes earlier this time, sample fewer."""
    while inside:
        chosen = [inside[i] for i in pick(rule, len(inside), seconds)]
        kept, decoded = {}, 0
        with Video(path, threads=1) as video:
            for decoded, frame in enumerate(video.in_order(), 1):
                if decoded - 1 in chosen:
                    kept[decoded - 1] = upright(frame)
                if decoded - 1 == chosen[-1]:
                    return chosen, np.stack([kept[i] for i in chosen])
        inside = [i for i in inside if i < decoded]
    return [], None


def _partial(index: Index, decodable: int) -> list[str]:
    """Why an answer may miss part of the video: fewer frames decode than its header announces."""
    if index.declared - decodable < 2:  # headers round their durations: one frame short is no damage
        return []
    reached = index.times[decodable] if decodable < len(index.times) else index.end
    return [f"only {decodable} of {index.declared} frames decode ({index.times[0]:.2f}–{reached:.2f} s of "
            f"{index.length:.1f} s)"]


def _no_frame(path: Path, window: Window, partial: list[str]) -> None:
    if window.whole:
        raise VideoQAError(f"{path}: video is corrupted or truncated, no frame decodes", Exit.INPUT)
    why = f" ({'; '.join(partial)})" if partial else ""
    raise VideoQAError(f"{path}: no frame of the window {window.label()} decodes{why}", Exit.INPUT)


def open_video(path: Path, threads: int = 0) -> Video:
    """The video opened, or the error that it is not one (an image is not: a usage error). Only its header is read,
    so this comes before hashing a file for the feature cache: a 20 GB file that is not a video is refused without
    being read."""
    check_file(path)
    if is_image(path):  # FFmpeg would read it as a one-frame video
        raise VideoQAError(f"{path}: is a still image, not a video (`videoqa ask` answers about one image)")
    return Video(path, threads)


def frame_size(path: Path) -> tuple[int, int] | None:
    """A video file's frame (height, width), from its header; None for a pipe (read once, when its frames are) or
    a file that does not open as a video (refused when its frames are read, after the checks that need no frame)."""
    if _is_pipe(path):
        return None
    try:
        with open_video(path) as video:
            return video.size
    except VideoQAError:
        return None


def read_frames(path: Path, count: Rule, reader: Video | None = None, *, threads: int = 0,
                window: Window = WHOLE) -> Frames:
    """Sample frames of the video (of its `window`) by `count` (a number, or a ByTime rule); damaged videos are
    sampled over the part that decodes.
    `reader`: the video, from `open_video`, when the caller opened it already."""
    if reader is not None:
        return reader.sample(count, window)
    with open_video(path, threads) as video:
        return video.sample(count, window)


def extent(path: Path) -> tuple[float, float, int]:
    """(when the last frame starts, when the video ends, in seconds; how many frames it has): what its segments
    are cut from. A video of which no frame decodes is refused, as `ask` refuses it."""
    with open_video(path) as video:
        if not video.decodable(damaged=False):
            _no_frame(path, WHOLE, [])
        return video.index.times[-1], video.index.end, len(video.index.times)


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
    """A still image as RGB, for the image tower, upright: turned by its EXIF orientation (cameras store portrait
    photos as landscape pixels with a tag), as viewers and transformers' `load_image` do. Pillow reads it fully now,
    so a broken file fails here."""
    from PIL import Image, ImageOps

    check_file(path)
    try:
        with _pillow_reading(), Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise VideoQAError(f"{path}: a {width} x {height} image, past the {MAX_IMAGE_PIXELS // 10**6} "
                                   "megapixels videoqa reads (a guard against decompression bombs)", Exit.INPUT)
            return rgb(ImageOps.exif_transpose(_decoded(image)))
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
