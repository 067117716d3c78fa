"""Stage 1: decode N uniformly spaced RGB frames from a video file with decord.

The sampling rule is the one of the original Video-LLaVA training code:
`np.linspace(0, n - 1, N, dtype=int)`, first and last frame included. A video
with fewer than N frames repeats frames by the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from videoqa.errors import Exit, VideoQAError


@dataclass
class Frames:
    pixels: np.ndarray  # (N, H, W, 3) uint8 RGB
    indices: list[int]  # index of each sampled frame in the video
    times: list[float]  # its presentation time in seconds


def frame_indices(n: int, count: int) -> list[int]:
    """Uniform sample of `count` indices out of `n` frames (training-code rule)."""
    return np.linspace(0, n - 1, count, dtype=int).tolist()


def check_file(path: Path) -> None:
    """Reject paths that cannot be media before handing them to a decoder."""
    if not path.exists():
        raise VideoQAError(f"{path}: no such file", Exit.INPUT)
    if path.is_dir():
        raise VideoQAError(f"{path}: is a directory, not a video file", Exit.INPUT)
    if path.stat().st_size == 0:
        raise VideoQAError(f"{path}: file is empty", Exit.INPUT)


def _open(path: Path):
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own log lines would flood stderr
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception:
        raise VideoQAError(f"{path}: not a readable video (no decodable video stream)", Exit.INPUT) from None


def _decodable_count(path: Path) -> int:
    """Frames a broken or header-less container really yields: decode until the first failure."""
    reader = _open(path)
    count = 0
    while True:
        try:
            reader.next()
        except Exception:  # StopIteration at the end, DECORDError at the damage
            return count
        count += 1


def _decode_one_by_one(path: Path, indices: list[int]) -> np.ndarray:
    reader = _open(path)
    wanted = set(indices)
    kept = {}
    for i in range(max(indices) + 1):
        frame = reader.next().asnumpy()
        if i in wanted:
            kept[i] = frame
    return np.stack([kept[i] for i in indices])


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
    try:
        pixels = reader.get_batch(indices).asnumpy() if indices else None
    except Exception:
        pixels = None
    if pixels is None:
        n = _decodable_count(path)
        if n == 0:
            raise VideoQAError(f"{path}: video is corrupted or truncated, no frame decodes", Exit.INPUT)
        indices = frame_indices(n, count)
        pixels = _decode_one_by_one(path, indices)
    return Frames(pixels=pixels, indices=indices, times=_times(reader, indices))
