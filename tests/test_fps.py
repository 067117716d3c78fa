"""Sampling by time (`--fps`, `--max-frames`; API `fps=`, `max_frames=`) for every command: int(seconds x fps) frames
spread by np.linspace(0, n - 1, N).round() (transformers' Qwen3-VL rule), within a window too, capped by
--max-frames, by the context and by the memory before decoding, with a note when a cap cut the rate. Expected
indices are computed by hand on a video whose frame i is grey level i, 10 frames a second."""

import json

import pytest

import videoqa
from conftest import asset, build_video_llava, needs_assets, reference_generate
from test_windows import write_grey_video
from videoqa.errors import Exit

pytestmark = needs_assets
QUESTION = "What happens?"


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    path = tmp_path_factory.mktemp("fps") / "grey.mkv"  # 100 frames, 10 s
    write_grey_video(path)
    return path


def indices(result) -> list[int]:
    assert result.code == 0, result
    return [frame["index"] for frame in json.loads(result.out.splitlines()[-1])["frames"]]


@pytest.mark.parametrize("args, expected", [
    (["--fps", 0.5], [0, 25, 50, 74, 99]),  # 10 s x 0.5 = 5: linspace(0, 99, 5) = 0, 24.75, 49.5, 74.25, 99
    (["--fps", 1, "--start", 2, "--end", 5], [20, 34, 49]),  # frames 20..49, 3 s: linspace(0, 29, 3) = 0, 14.5, 29
    (["--fps", 2, "--max-frames", 4], [0, 33, 66, 99]),  # 20 wanted, 4 allowed: linspace(0, 99, 4)
    (["--fps", 50], list(range(100))),  # past the video's own rate: every frame, no note
])
def test_frames_by_time_by_hand(cli, tiny_model, grey, args, expected):
    result = cli("ask", grey, QUESTION, "-m", tiny_model, "-n", 2, "--json", *args)
    assert indices(result) == expected
    record = json.loads(result.out)
    assert [f["time"] for f in record["frames"]] == pytest.approx([i / 10 for i in expected])
    if "--max-frames" in args:
        assert record["warnings"] == ["--fps 2: 10.0 s would take 20 frames; --max-frames allows 4, so they are "
                                      "0.4 a second"]
        assert record["warnings"][0] in result.err  # also a note on stderr
    else:
        assert record["warnings"] == []


def test_the_context_caps_the_rate_before_decoding(cli, grey, tmp_path):
    """A 256-position context less the question's 64: (192 - 1) // 5 = 38 frames of 5 positions."""
    small = build_video_llava(tmp_path / "small", context=256)
    result = cli("ask", grey, QUESTION, "-m", small, "-n", 2, "--json", "--fps", 10)
    assert len(indices(result)) == 38
    assert "the model's context allows 38" in json.loads(result.out)["warnings"][0]


def test_the_memory_caps_the_rate_before_decoding(cli, tiny_model, grey):
    """A budget between 38 frames' estimate and 39's (where the KV cache moves up a 256-token bucket)."""
    from videoqa.session import Checkpoint

    found = Checkpoint(tiny_model, device="cpu", dtype="float32", check_memory=False, cache=False)
    fits, over = (found.estimate(frames=n, max_new_tokens=2, medium="video").total for n in (38, 39))
    assert fits < over
    result = cli("ask", grey, QUESTION, "-m", tiny_model, "-n", 2, "--json", "--fps", 10, "--dtype", "float32",
                 "--max-memory", f"{int((fits + over) / 2)}B")
    assert len(indices(result)) == 38
    assert "the memory free allows 38" in json.loads(result.out)["warnings"][0]


def test_frames_and_fps_together_are_refused(cli, tiny_model, grey):
    result = cli("ask", grey, QUESTION, "-m", tiny_model, "--frames", 4, "--fps", 1)
    assert result.code == Exit.USAGE and result.out == "" and "--frames and --fps" in result.err


def test_answers_by_time_equal_generate(tiny_model):
    video = asset("videos/videollava_sample_demo_1.mp4")  # 9.72 s: 9 frames at 1 a second
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    media = model.media(video, fps=1)
    # linspace(0, 242, 9) = 0, 30.25, 60.5, 90.75, 121, ..., 181.5, 211.75, 242, rounded half to even
    assert media.frames.indices == [0, 30, 60, 91, 121, 151, 182, 212, 242]
    answer = model.ask(media, QUESTION, max_new_tokens=8)
    assert answer.tokens == reference_generate(tiny_model, media.frames, QUESTION, 8)
    with pytest.raises(videoqa.VideoQAError):
        model.chat(media).ask(QUESTION, fps=2)  # a conversation's media is read already


def test_chat_set_fps_applies_to_the_next_video(cli, tiny_model, grey, monkeypatch):
    import io
    import sys

    lines = ["/set fps 0.5", f"/video {grey}", "/frames", "/set fps none", f"/video {grey}"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    result = cli("chat", "-m", tiny_model, "-n", 2)
    assert result.code == 0, result
    shown = result.err.splitlines()
    assert any(line.startswith(f"video {grey}: 5 frames of the whole video") for line in shown)
    assert [line.split()[1] for line in shown if line.startswith("frame ")] == ["0", "25", "50", "74", "99"]
    assert any(line.startswith(f"video {grey}: 8 frames of the whole video") for line in shown)


def test_caption_timeline_and_find_sample_by_time(cli, tiny_model, grey):
    caption = cli("caption", grey, "-m", tiny_model, "-n", 2, "--fps", 0.5)
    assert indices(caption) == [0, 25, 50, 74, 99]
    timeline = cli("timeline", grey, "--segments", 2, "-m", tiny_model, "-n", 2, "--fps", 1)
    assert timeline.code == 0, timeline
    segments = [[f["index"] for f in json.loads(line)["frames"]] for line in timeline.out.splitlines()]
    # each 5 s segment, 50 frames: linspace(0, 49, 5) = 0, 12.25, 24.5, 36.75, 49
    assert segments == [[0, 12, 24, 37, 49], [50, 62, 74, 87, 99]]
    found = cli("find", grey, "a grey square", "--segments", 2, "-m", tiny_model, "--fps", 1, "--json")
    assert found.code == 0, found
    assert [[f["index"] for f in s["frames"]] for s in json.loads(found.out)["segments"]] == segments


def test_the_feature_cache_knows_the_rule(tiny_model, grey, counted):
    model = videoqa.load(tiny_model, device="cpu", dtype="float32")
    first = model.features(grey, fps=0.5)
    assert videoqa.load(tiny_model, device="cpu", dtype="float32").features(grey, fps=0.5).equal(first)
    model.features(grey, frames=5)  # five frames too, but spread by the other rule: another entry
    assert counted["towers"] == [5, 5]


def test_a_loaded_model_still_caps_the_rate_by_the_memory(tiny_model, grey):
    """Once loaded, the weights the estimate counts are resident: the cap is the same as before loading."""
    from videoqa.session import Checkpoint

    found = Checkpoint(tiny_model, device="cpu", dtype="float32", check_memory=False, cache=False)
    fits, over = (found.estimate(frames=n, max_new_tokens=256, medium="video").total for n in (38, 39))
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False, max_memory=(fits + over) / 2)
    frames = model.media(grey, fps=10).frames
    assert len(frames.indices) == 38 and "the memory free allows 38" in frames.warnings[0]
