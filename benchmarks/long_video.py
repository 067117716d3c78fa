"""Long files stay fast: the frames stage of a 20-minute video against a 20-second one, and a timeline's frame decoding
seeking per segment against one sequential pass.

    python benchmarks/long_video.py                      # writes the test videos into a temporary folder
    python benchmarks/long_video.py --folder /tmp/long   # keeps them there (and reuses them next time)
    python benchmarks/long_video.py --keyint 50          # a keyframe every 2 s, as phones and streams have

The test videos are 640x360 H.264 at 25 fps (libx264 with B-frames and, unless --keyint says otherwise, its default
keyframe interval of 250 frames), a moving gradient with a frame counter: 20 seconds and 20 minutes long. The longest real asset is measured beside
them. Every time is the median of --repeats runs; no model is involved (the frames stage only, without the feature
cache). The strategies must give the same frames, and the sequential pass is the reference they are checked against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from videoqa.frames import Video, frame_indices, read_frames, upright
from videoqa.session import segments

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "videos"


def write_video(path: Path, seconds: int, keyint: int, fps: int = 25) -> Path:
    """A 640x360 H.264 video: a gradient that moves 3 px a frame, and a block whose grey level counts the frames; a
    keyframe every `keyint` frames at most."""
    import av

    if path.exists():
        return path
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(keyint)}
        y, x = np.mgrid[0:360, 0:640]
        base = ((x + y) % 256).astype(np.uint8)[..., None].repeat(3, 2)
        for i in range(seconds * fps):
            image = np.roll(base, 3 * i, axis=1)
            image[:40, :200] = 7 * i % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def median_time(work, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def chosen(video: Video, windows, count: int) -> list[list[int]]:
    """The frame positions the timeline samples from each window."""
    index = video.index
    picked = []
    for window in windows:
        inside = window.positions(index.times, index.end)
        picked.append([inside[i] for i in frame_indices(len(inside), count)])
    return picked


def index_only(path: Path):
    """The frame index alone: every packet read (30,000 for 20 minutes), no frame decoded."""
    with Video(path) as video:
        return video.index


def seek_per_segment(path: Path, windows, count: int) -> list[np.ndarray]:
    """Each segment read on its own, as any one window is read: the video opened, indexed, sought."""
    return [read_frames(path, count, window=window).pixels for window in windows]


def one_walker(path: Path, windows, count: int) -> list[np.ndarray]:
    """What `timeline` does: one open video, its decoder walking forward and seeking past what no segment needs."""
    with Video(path) as video:
        return [video.sample(count, window).pixels for window in windows]


def sequential(path: Path, windows, count: int) -> list[np.ndarray]:
    """One pass in order without seeking: every frame decoded, the wanted ones converted to RGB."""
    with Video(path) as video:
        picked = chosen(video, windows, count)
        wanted = {position for positions in picked for position in positions}
        video.container.seek(video.index.pts[0], stream=video.stream, backward=True)  # back from indexing, at the end
        kept = {}
        for position, frame in enumerate(video.in_order()):
            if position in wanted:
                kept[position] = upright(frame)
    return [np.stack([kept[p] for p in positions]) for positions in picked]


def decord_wrong_frames(path: Path, windows, count: int, reference: list[np.ndarray]) -> dict | None:
    """decord's time for the same frames (get_batch per segment on one reader), and how many differ from the
    sequential pass; None without decord (it is not a dependency any more)."""
    try:
        import decord
    except ImportError:
        return None
    decord.logging.set_level(decord.logging.QUIET)
    with Video(path) as video:
        picked = chosen(video, windows, count)
    start = time.perf_counter()
    reader = decord.VideoReader(str(path))
    got = [reader.get_batch(positions).asnumpy() for positions in picked]
    seconds = time.perf_counter() - start
    wrong = sum(int(np.abs(a.astype(int) - b).mean() > 2) for g, r in zip(got, reference) for a, b in zip(g, r))
    return {"seconds": round(seconds, 3), "wrong_frames": wrong, "frames": sum(len(p) for p in picked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--segments", type=int, default=40)
    parser.add_argument("--keyint", type=int, default=250, help="frames between keyframes at most (x264's default)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    short = write_video(folder / f"20s-g{args.keyint}.mp4", 20, args.keyint)
    long = write_video(folder / f"20min-g{args.keyint}.mp4", 20 * 60, args.keyint)
    real = ASSETS / "videollava_sample_demo_22.mp4"  # the longest real asset: 1090 frames, 36.3 s
    stage = {name: round(median_time(lambda p=path: read_frames(p, 8), args.repeats)[0], 3)
             for name, path in (("20s", short), ("20min", long), ("real_36s", real))}
    index = round(median_time(lambda: index_only(long), args.repeats)[0], 3)
    windows = segments(long, count=args.segments)
    timings = {}
    for name, strategy in (("sequential", sequential), ("seek_per_segment", seek_per_segment),
                           ("one_walker", one_walker)):
        seconds, frames = median_time(lambda s=strategy: s(long, windows, 8), max(1, args.repeats // 2))
        timings[name] = {"seconds": round(seconds, 2), "frames": frames}
    reference = timings["sequential"]["frames"]
    for name in ("seek_per_segment", "one_walker"):
        assert all(np.array_equal(a, b) for a, b in zip(timings[name]["frames"], reference)), name
    print(json.dumps({
        "frames_stage_8_frames_s": stage, "ratio_20min_to_20s": round(stage["20min"] / stage["20s"], 2),
        "of_which_index_20min_s": index,
        "timeline_frames_40_segments_s": {name: t["seconds"] for name, t in timings.items()},
        "decord_get_batch": decord_wrong_frames(long, windows, 8, reference),
    }, indent=1))


if __name__ == "__main__":
    main()
