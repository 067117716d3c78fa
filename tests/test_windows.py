"""Time windows (`--start`/`--end`, the API's start/end, chat's `/video PATH START END`): the frames sampled from a
window, hand-computed on a video whose frame i is grey level i; every bad window is one line and exit code 2; the
feature cache tells windows apart."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import videoqa
from conftest import assert_clean_failure, asset, needs_assets, reference_generate
from videoqa.errors import Exit, VideoQAError
from videoqa.frames import read_frames
from videoqa.windows import clock, parse_duration, parse_time, window

VIDEO = "videos/videollava_sample_demo_1.mp4"  # 243 frames at 25 fps: frame i at i / 25 s, 9.72 s long


def write_grey_video(path: Path, count: int = 100, fps: int = 10) -> None:
    """Frame i is a flat grey of level i, losslessly coded (FFV1): a decoded frame tells its own index. At 10 fps
    frame i starts at i / 10 s (a millisecond time base: the times are exact)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "bgr0"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def grey(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grey") / "grey.mkv"
    write_grey_video(path)
    return path


@pytest.mark.parametrize(
    "start, end, count, indices",
    [
        # frames 20..49 are in [2, 5): linspace(0, 29, 4) = 0, 9.67, 19.33, 29
        (2, 5, 4, [20, 29, 39, 49]),
        # from 7.5 s (in HH:MM:SS form) to the end: frames 75..99, linspace(0, 24, 3) = 0, 12, 24
        ("00:00:07.5", None, 3, [75, 87, 99]),
        # before 1.05 s (MM:SS.mmm): frames 0..10, linspace(0, 10, 4) = 0, 3.33, 6.67, 10
        (None, "0:01.050", 4, [0, 3, 6, 10]),
        # two frames for four asked repeat by the same rule: linspace(0, 1, 4) = 0, 0.33, 0.67, 1
        ("3", "3.2", 4, [30, 30, 30, 31]),
        # a start exactly on a frame takes it; an end exactly on one leaves it out
        (1, 2, 2, [10, 19]),
    ],
)
def test_window_sampling_by_hand(grey, start, end, count, indices):
    frames = read_frames(grey, count, window=window(start, end))
    assert frames.indices == indices
    assert frames.times == pytest.approx([i / 10 for i in indices], abs=1e-9)  # absolute times in the video
    assert [int(level) for level in frames.pixels[:, 0, 0, 0]] == indices  # the pixels are those frames'
    assert frames.warnings == []


def test_no_window_is_the_whole_video(grey):
    assert read_frames(grey, 4).indices == read_frames(grey, 4, window=window()).indices == [0, 33, 66, 99]


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 90.0), ("90.5", 90.5), (".5", 0.5), ("1:30", 90.0), ("01:30.250", 90.25), ("1:02:03.5", 3723.5),
     ("0:00", 0.0), (12.5, 12.5)],
)
def test_times(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["-1", "-0:30", "abc", "1:2:3:4", "1:75", "1:60:00", "", "1e3", "nan", "inf", ":30"])
def test_bad_times(text):
    with pytest.raises(VideoQAError) as raised:
        parse_time(text)
    assert raised.value.code == Exit.USAGE


@pytest.mark.parametrize("text, seconds", [("30", 30.0), ("10s", 10.0), ("2m", 120.0), ("1.5h", 5400.0),
                                           ("1:30", 90.0), ("0.5", 0.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-5", "ten", "5x", "m"])
def test_bad_durations(text):
    with pytest.raises(VideoQAError, match="--every"):
        parse_duration(text)


def test_clock():
    assert [clock(t) for t in (0, 30, 90.25, 3723.5, 59.9999)] == ["00:00", "00:30", "01:30.250", "01:02:03.500",
                                                                    "01:00"]


@needs_assets
@pytest.mark.parametrize(
    "args, words",
    [
        (["--start", "5", "--end", "5"], ["end 00:05 is not after start 00:05"]),
        (["--start", "5", "--end", "3"], ["not after start"]),
        (["--start", "-1"], ["--start", "not negative"]),
        (["--end", "-0:01"], ["--end", "not negative"]),
        (["--start", "1:2:3:4"], ["--start", "[HH:]MM:SS"]),
        (["--end", "soon"], ["--end", "[HH:]MM:SS"]),
        (["--start", "20"], ["at or past the end", "9.72 s"]),  # the message names the duration
        (["--start", "9.72"], ["at or past the end", "9.72 s"]),
        (["--start", "9.70", "--end", "9.71"], ["holds no frame"]),  # frames at 9.68 and (none) after
        (["--start", "1" + "0" * 400 + ":00:00"], ["--start", "longer than any video"]),  # past what floats hold
        (["--end", "9" * 5000], ["--end", "longer than any video"]),  # past what int() converts
    ],
)
def test_bad_windows_are_one_line_and_exit_2(cli, tiny_model, args, words):
    result = cli("ask", asset(VIDEO), "What happens?", "-m", tiny_model, *args)
    assert_clean_failure(result, Exit.USAGE, *words)


@needs_assets
@pytest.mark.parametrize("args, words", [
    (["--start", "5"], ["no frame of the window 00:05–end decodes", "25 of 243"]),  # past the data, not the video
    (["--start", "0.5", "--end", "1"], None),  # inside what decodes: answered
    (["--start", "20"], ["at or past the end", "9.72 s"]),  # the length the header gives, not the data's 1.12 s
])
def test_a_window_of_a_truncated_video(cli, tiny_model, tmp_path, args, words):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(asset(VIDEO).read_bytes()[:200_000])  # 28 frames' packets, 25 decode: 0.00–1.00 s of 9.72 s
    result = cli("ask", cut, "What happens?", "-m", tiny_model, "-n", 2, *args)
    if words is None:
        assert result.code == 0, result
    else:
        assert_clean_failure(result, Exit.USAGE if "past the end" in words[0] else Exit.INPUT, *words)


@needs_assets
def test_a_window_on_an_image_is_refused(cli, tiny_model):
    result = cli("ask", asset("images/videollava_desert.jpg"), "What?", "-m", tiny_model, "--start", "1")
    assert_clean_failure(result, Exit.USAGE, "image has no time window")


@needs_assets
def test_ask_in_a_window_equals_generate_on_the_window_frames(cli, tiny_model):
    result = cli("ask", asset(VIDEO), "What happens?", "-m", tiny_model, "-n", 8, "--start", "2", "--end", "0:04",
                 "--json")
    record = json.loads(result.out)
    frames = read_frames(asset(VIDEO), 8, window=window(2, 4))
    # frames 50..99 are in [2, 4): linspace(0, 49, 8) = 0, 7, 14, 21, 28, 35, 42, 49
    assert [f["index"] for f in record["frames"]] == frames.indices == [50, 57, 64, 71, 78, 85, 92, 99]
    assert [f["time"] for f in record["frames"]] == pytest.approx([i / 25 for i in frames.indices], abs=1e-3)
    assert record["tokens"] == reference_generate(tiny_model, frames, "What happens?", 8)


@needs_assets
def test_the_api_takes_windows(tiny_model):
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    answer = model.ask(asset(VIDEO), "What happens?", start="00:06", end=8.0, max_new_tokens=6)
    assert answer.frames[0] == {"index": 150, "time": 6.0} and answer.frames[-1]["index"] == 199
    assert answer.tokens == model.chat(asset(VIDEO), start=6, end="0:08").ask("What happens?", max_new_tokens=6).tokens
    assert model.features(asset(VIDEO), start=6, end=8).shape == model.features(asset(VIDEO)).shape
    with pytest.raises(videoqa.VideoQAError) as raised:
        model.ask(asset(VIDEO), "Why?", start=3, end=2)
    assert raised.value.exit_code == Exit.USAGE


@needs_assets
def test_the_cache_key_includes_the_window(cli, tiny_model, counted):
    def ask(*window):
        result = cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, "-n", 4, "--json", *window)
        return json.loads(result.out)["frames"]

    whole, early, early_again, late = ask(), ask("--end", "3"), ask("--end", "3"), ask("--start", "3")
    assert len(counted["towers"]) == 3  # the repeated window came from the cache
    assert early == early_again and len({json.dumps(f) for f in (whole, early, late)}) == 3


@needs_assets
def test_chat_video_takes_a_window(cli, tiny_model, monkeypatch):
    lines = [f"/video {asset(VIDEO)} 1:00", f"/video {asset(VIDEO)} 2 4", "/frames", "Why?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    result = cli("chat", "-m", tiny_model, "-n", 3, "--json")
    assert result.code == Exit.USAGE  # the first line failed: a start past the end; the session went on
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "at or past the end" in errors[0] and "9.72 s" in errors[0]
    shown = [line.split()[1] for line in result.err.splitlines() if line.startswith("frame")]
    assert shown == ["50", "57", "64", "71", "78", "85", "92", "99"]
    assert [f["index"] for f in json.loads(result.out)["frames"]] == [50, 57, 64, 71, 78, 85, 92, 99]


@needs_assets
def test_caption_applies_the_window_to_each_video(cli, tiny_model):
    short, longer = asset("videos/llavanext_xU25MMA2N4aVtYay.mp4"), asset(VIDEO)  # 3.2 s and 9.72 s
    result = cli("caption", short, longer, "-m", tiny_model, "-n", 2, "--start", "4", "--end", "6")
    assert result.code == Exit.SOME_FAILED, result
    first, second = [json.loads(line) for line in result.out.splitlines()]
    assert "at or past the end" in first["error"] and first["frames"] == []
    assert second["error"] is None and second["frames"][0]["index"] == 100 and second["frames"][-1]["index"] == 149
