"""`videoqa timeline`: one cue per segment with its times, SRT and WebVTT that real parsers read, each segment's
greedy tokens equal to transformers' `generate` on its frames, resume for every format (after SIGKILL too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import videoqa
from conftest import assert_clean_failure, asset, needs_assets, reference_generate
from videoqa.errors import Exit
from videoqa.families import DESCRIBE
from videoqa.frames import read_frames
from videoqa.windows import window

pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")  # 243 frames at 25 fps: 9.72 s
EVERY_3 = [(0, 3), (3, 6), (6, 9), (9, 9.72)]  # --every 3: the last segment ends at the video's end


def timeline(cli, model, *args):
    result = cli("timeline", VIDEO, "-m", model, *args)
    assert result.code == 0, result
    return result


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def summary(err: str) -> dict:
    """The done, failed and skipped rows of the summary on stderr."""
    rows = [line.split() for line in err.splitlines()]
    return {row[0]: row[1] for row in rows if row and row[0] in ("done", "failed", "skipped")}


def words(text: str) -> str:
    return " ".join(text.split())


def test_srt_and_vtt_cues_and_each_segment_equals_generate(cli, tiny_model, tmp_path):
    srt_file, vtt_file = tmp_path / "t.srt", tmp_path / "t.vtt"
    timeline(cli, tiny_model, "-n", 6, "--every", "3", "--out", srt_file, "-b", "3")  # format from the suffix
    timeline(cli, tiny_model, "-n", 6, "--every", "0:03", "--out", vtt_file)
    jsonl = records(timeline(cli, tiny_model, "-n", 6, "--every", "3s", "-b", "1").out)  # stdout: JSONL
    import srt
    import webvtt

    cues = list(srt.parse(srt_file.read_text()))
    assert [(c.index, c.start.total_seconds(), c.end.total_seconds()) for c in cues] == [
        (i + 1, a, b) for i, (a, b) in enumerate(EVERY_3)]
    vtt = webvtt.read(str(vtt_file))
    assert [(c.start, c.end) for c in vtt] == [("00:00:00.000", "00:00:03.000"), ("00:00:03.000", "00:00:06.000"),
                                               ("00:00:06.000", "00:00:09.000"), ("00:00:09.000", "00:00:09.720")]
    assert [(r["start"], r["end"]) for r in jsonl] == EVERY_3
    for rec, cue, caption in zip(jsonl, cues, vtt):
        assert words(cue.content) == words(caption.text) == words(rec["answer"])
        frames = read_frames(VIDEO, 8, window=window(rec["start"], rec["end"]))
        assert [f["index"] for f in rec["frames"]] == frames.indices
        assert min(frames.times) >= rec["start"] and max(frames.times) < rec["end"]
        assert rec["question"] == DESCRIBE and rec["warnings"] == [] and rec["error"] is None
        assert rec["tokens"] == reference_generate(tiny_model, frames, DESCRIBE, 6)  # batched (3) and alone (1)


def test_segments_markdown_and_a_prompt(cli, tiny_model):
    shown = timeline(cli, tiny_model, "-n", 3, "--segments", "3", "--format", "md", "-p", "What is the baby doing?").out
    assert shown.startswith(f"# Timeline of {VIDEO}\n\n## 00:00–00:03.240\n")
    headings = [line for line in shown.splitlines() if line.startswith("## ")]
    assert headings == ["## 00:00–00:03.240", "## 00:03.240–00:06.480", "## 00:06.480–00:09.720"]
    assert "\n\n\n" not in shown and shown.endswith("\n\n")


def cut_after(text: str, fmt: str, whole: int) -> str:
    """The first `whole` blocks of a file (a header counts as one) and half of the next: an interrupted write."""
    end = "\n" if fmt == "jsonl" else "\n\n"
    at = 0
    for _ in range(whole):
        at = text.index(end, at) + len(end)
    return text[: at + 12]


@pytest.mark.parametrize("fmt, whole", [("jsonl", 2), ("srt", 2), ("vtt", 3), ("md", 3)])
def test_resume_skips_what_is_written_and_keeps_the_file_valid(cli, tiny_model, tmp_path, fmt, whole):
    full, out = tmp_path / f"full.{fmt}", tmp_path / f"part.{fmt}"
    timeline(cli, tiny_model, "-n", 4, "--every", "2", "--out", full)
    out.write_text(cut_after(full.read_text(), fmt, whole))
    result = timeline(cli, tiny_model, "-n", 4, "--every", "2", "--out", out, "--resume")
    assert summary(result.err) == {"done": "3", "failed": "0", "skipped": "2"}  # 5 segments of 2 s
    if fmt == "jsonl":  # timings differ from run to run
        assert [(r["start"], r["tokens"]) for r in records(out.read_text())] == [
            (r["start"], r["tokens"]) for r in records(full.read_text())]
    else:
        assert out.read_text() == full.read_text()
    again = timeline(cli, tiny_model, "--every", "2", "--out", out, "--resume")
    assert summary(again.err) == {"done": "0", "failed": "0", "skipped": "5"}


def test_resume_after_kill_9_leaves_a_valid_srt_with_each_segment_once(cli, tiny_model, tmp_path):
    import srt

    out = tmp_path / "t.srt"
    command = [sys.executable, "-m", "videoqa", "timeline", str(VIDEO), "-m", str(tiny_model), "--every", "0.5",
               "-b", "1", "-n", "300", "--out", str(out)]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    while process.poll() is None and (not out.exists() or out.read_text().count(" --> ") < 2):
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    first = out.read_text()
    killed = list(srt.parse(first))  # every cue whole after the kill
    assert 2 <= len(killed) < 20

    timeline(cli, tiny_model, "-n", 2, "--every", "0.5", "--out", out, "--resume")
    cues = list(srt.parse(out.read_text()))
    assert [c.index for c in cues] == list(range(1, 21))  # 0.5 s segments of 9.72 s: 20, numbered in order
    assert [c.start.total_seconds() for c in cues] == [k / 2 for k in range(20)]
    assert cues[-1].end.total_seconds() == 9.72
    assert out.read_text().startswith(first)  # nothing written before was touched


def test_a_video_that_decodes_in_part(cli, tiny_model, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(VIDEO.read_bytes()[:200_000])  # 28 frames' packets are there, 25 decode
    result = cli("timeline", cut, "-m", tiny_model, "-n", 2, "--every", "0.5")
    assert result.code == Exit.SOME_FAILED, result
    first, second, last = records(result.out)
    assert first["warnings"] == second["warnings"] and " of 243 frames decode" in first["warnings"][0]
    assert first["error"] is None and second["error"] is None
    assert last["start"] == 1.0 and "no frame of the window 00:01–00:01.120 decodes" in last["error"]
    assert result.err.count("note:") == 1  # one note for the video, not one per segment


def test_the_api(tiny_model):
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    recs = list(model.timeline(VIDEO, "What happens?", every=5, max_new_tokens=3, batch_size=2))
    assert [(r["start"], r["end"]) for r in recs] == [(0, 5), (5, 9.72)] and all(len(r["tokens"]) == 3 for r in recs)
    assert [(w.start, w.end) for w in videoqa.segments(VIDEO, count=2)] == [(0, 4.86), (4.86, 9.72)]


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--every", "2", "--segments", "3"], Exit.USAGE, "give one of them"),
        (["--every", "0"], Exit.USAGE, "more than 0 s"),
        (["--segments", "0"], Exit.USAGE, "--segments"),
        (["--resume"], Exit.USAGE, "--resume needs --out"),
        (["--segments", "1000000000"], Exit.USAGE, "the video has 243 frames"),  # nearly all would be empty
        (["--every", "0.0000001"], Exit.USAGE, "the video has 243 frames"),
        (["--every", "1" + "0" * 400 + ":00:00"], Exit.USAGE, "longer than any video"),
    ],
)
def test_usage_errors(cli, tiny_model, args, code, text):
    result = cli("timeline", VIDEO, "-m", tiny_model, *args)
    assert result.code == code and text in result.err and result.out == ""


def test_an_existing_out_is_not_replaced_and_a_missing_video_is_exit_3(cli, tiny_model, tmp_path):
    out = tmp_path / "t.srt"
    out.write_text("1\n00:00:00,000 --> 00:00:01,000\nx\n\n")
    result = cli("timeline", VIDEO, "-m", tiny_model, "--out", out)
    assert result.code == Exit.USAGE and "--resume to continue it" in result.err
    assert cli("timeline", tmp_path / "nope.mp4", "-m", tiny_model).code == Exit.INPUT


@pytest.mark.parametrize("name, text", [
    ("notes.md", "# My notes\nimportant stuff\n"),  # no blank line: read as one unfinished entry
    ("x.srt", "hello\n"),
    ("film.srt", '{"video": "a.mp4", "start": 0, "end": 1}\n'),  # another format's records
    ("y.srt", "1\n00:00:00,000 --> 00:00:02,000\nfine\n\nmy own note"),  # ours, then someone's text
    ("z.md", "# Timeline of a.mp4\n\n## 00:00–00:02\nfine\n\nmy own note"),
])
def test_resume_leaves_a_file_that_is_not_videoqas_untouched(cli, tiny_model, tmp_path, name, text):
    out = tmp_path / name
    out.write_text(text)
    result = cli("timeline", VIDEO, "-m", tiny_model, "-n", 2, "--every", "2", "--out", out, "--resume")
    assert_clean_failure(result, Exit.USAGE, name, "cannot resume it")
    assert out.read_text() == text


def test_stopping_early_leaves_no_segment_reading_a_closed_file(tiny_model):
    """`interrupted()` after the first batch: the segments decoding ahead on the background thread are left, and the video
    is closed only once none is being read (PyAV would crash on a closed file)."""
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    for _ in range(3):
        recs = list(model.timeline(VIDEO, every=0.5, max_new_tokens=1, batch_size=1, interrupted=lambda: True))
        assert [r["start"] for r in recs] == [0]
        first = next(iter(model.timeline(VIDEO, every=0.5, max_new_tokens=1, batch_size=2)))  # abandoned at once
        assert first["start"] == 0
