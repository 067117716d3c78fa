"""`videoqa caption`: records for good and broken videos, batching that changes no answer, crash-safe resume."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_clean_failure, asset, needs_assets
from videoqa.errors import Exit

pytestmark = needs_assets
REAL = ["videollava_sample_demo_1.mp4", "videollava_sample_demo_3.mp4", "videollava_sample_demo_9.mp4",
        "videollama2_1034346401.mp4", "llavanext_xU25MMA2N4aVtYay.mp4"]


@pytest.fixture
def folder(tmp_path):
    """Real videos (linked) and broken ones side by side."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in REAL:
        (clips / name).symlink_to(asset(f"videos/{name}"))
    (clips / "notes.mp4").write_text("not a video\n")
    (clips / "empty.mov").write_bytes(b"")
    (clips / "readme.txt").write_text("not matched by the glob\n")
    return clips


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().split("\n") if line]  # JSONL lines end at "\n" only


def test_folder_of_real_and_broken_videos(cli, tiny_model, folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = cli("caption", folder, "-m", tiny_model, "-n", 6, "--out", out)
    assert result.code == Exit.SOME_FAILED, result
    records = read_jsonl(out)
    assert sorted(r["video"] for r in records) == sorted(str(folder / n) for n in [*REAL, "notes.mp4", "empty.mov"])
    broken = {r["video"]: r for r in records if r["error"]}
    assert set(broken) == {str(folder / "notes.mp4"), str(folder / "empty.mov")}
    assert "not a readable video" in broken[str(folder / "notes.mp4")]["error"]
    assert "empty" in broken[str(folder / "empty.mov")]["error"]
    assert all(len(r["tokens"]) == 6 and r["answer"] and len(r["frames"]) == 8 for r in records if not r["error"])
    assert all(r["question"] == "Describe this video." for r in records)
    assert "done" in result.err and "failed" in result.err and "videos/s" in result.err
    assert result.out == ""


def test_an_image_among_the_videos_is_its_own_error_record(cli, tiny_model, tmp_path):
    """FFmpeg reads a JPEG as a one-frame video: caption would answer 8 copies of it through the video tower, which
    is not what `ask` answers about an image. It is refused, on its own record, and named as an image."""
    out = tmp_path / "c.jsonl"
    image = asset("images/videollava_desert.jpg")
    result = cli("caption", asset(f"videos/{REAL[0]}"), image, "-m", tiny_model, "-n", 2, "--out", out)
    assert result.code == Exit.SOME_FAILED, result
    errors = {r["video"]: r["error"] for r in read_jsonl(out)}
    assert errors[str(asset(f"videos/{REAL[0]}"))] is None
    assert "still image, not a video" in errors[str(image)] and "videoqa ask" in errors[str(image)]


def test_all_failed_and_all_done_exit_codes(cli, tiny_model, folder, tmp_path):
    broken = cli("caption", folder / "notes.mp4", folder / "empty.mov", "-m", tiny_model, "-n", 2)
    assert broken.code == Exit.ALL_FAILED and len(broken.out.splitlines()) == 2
    good = cli("caption", folder / REAL[0], "-m", tiny_model, "-n", 2)
    assert good.code == 0 and json.loads(good.out)["error"] is None


def test_batching_changes_no_greedy_answer(cli, tiny_model, folder, tmp_path):
    runs = {}
    for size in (1, 4):
        out = tmp_path / f"b{size}.jsonl"
        assert cli("caption", folder, "-m", tiny_model, "-n", 16, "-b", size, "--out", out).code == Exit.SOME_FAILED
        runs[size] = {r["video"]: r["tokens"] for r in read_jsonl(out)}
    assert runs[1] == runs[4]
    for name in REAL[:3]:
        ask = cli("ask", folder / name, "Describe this video.", "-m", tiny_model, "-n", 16, "--json")
        assert json.loads(ask.out)["tokens"] == runs[4][str(folder / name)]


def test_csv_records(cli, tiny_model, folder):
    result = cli("caption", folder / REAL[0], folder / "notes.mp4", "-m", tiny_model, "-n", 3, "--format", "csv")
    rows = list(csv.DictReader(result.out.splitlines(keepends=True)))
    assert [r["video"] for r in rows] == [str(folder / REAL[0]), str(folder / "notes.mp4")]
    assert len(json.loads(rows[0]["tokens"])) == 3 and rows[0]["error"] == "" and rows[1]["error"]


def caption_process(tiny_model, folder, out, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "videoqa", "caption", str(folder), "-m", str(tiny_model), "--out", str(out), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_lines(out, count, process):
    while process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= count:
            return
        time.sleep(0.02)


def test_kill_9_then_resume_writes_every_video_exactly_once(tiny_model, folder, tmp_path, cli):
    for i in range(6):  # more work, so the kill lands mid-run (copies: a link to a video is that video)
        shutil.copy(asset(f"videos/{REAL[i % len(REAL)]}"), folder / f"copy{i}.mp4")
    out = tmp_path / "captions.jsonl"
    process = caption_process(tiny_model, folder, out, "-b", "1", "-n", "300")
    wait_for_lines(out, 2, process)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    first = out.read_text()
    assert all(json.loads(line) for line in first.splitlines())  # every line whole after the kill
    assert 2 <= first.count("\n") < 13

    result = cli("caption", folder, "-m", tiny_model, "-n", 4, "-b", 3, "--out", out, "--resume")
    assert result.code == Exit.SOME_FAILED, result
    videos = [r["video"] for r in read_jsonl(out)]
    assert len(videos) == len(set(videos)) == 13  # 11 videos, 2 broken files
    assert first == out.read_text()[: len(first)]  # nothing written before was touched


def test_resume_repairs_a_half_written_last_line(cli, tiny_model, folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    cli("caption", folder / REAL[0], "-m", tiny_model, "-n", 2, "--out", out)
    with out.open("a") as f:
        f.write('{"video": "' + str(folder / REAL[1]) + '", "answ')  # a crash mid-line elsewhere
    result = cli("caption", folder / REAL[0], folder / REAL[1], "-m", tiny_model, "-n", 2, "--out", out, "--resume")
    assert result.code == 0
    records = read_jsonl(out)
    assert [r["video"] for r in records] == [str(folder / REAL[0]), str(folder / REAL[1])]


def test_ctrl_c_finishes_the_batch_in_flight(tiny_model, folder, tmp_path):
    for i in range(5):
        shutil.copy(asset(f"videos/{REAL[i]}"), folder / f"copy{i}.mp4")
    out = tmp_path / "captions.jsonl"
    process = caption_process(tiny_model, folder, out, "-b", "2", "-n", "400", "--glob", "*.mp4")
    wait_for_lines(out, 1, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == Exit.INTERRUPTED, err
    lines = out.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert len(lines) % 2 == 0 and len(lines) < 11  # whole batches of 2, and not all 11 videos


@pytest.mark.parametrize(
    "args, words",
    [
        (["--resume"], "--resume needs --out"),
        (["--glob", "*.nothing"], "no videos found"),
    ],
)
def test_usage_errors(cli, tiny_model, folder, args, words):
    result = cli("caption", folder, "-m", tiny_model, *args)
    assert result.code == Exit.USAGE and words in result.err and result.out == ""


def test_existing_output_is_not_clobbered(cli, tiny_model, folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_text("precious\n")
    result = cli("caption", folder, "-m", tiny_model, "--out", out)
    assert result.code == Exit.USAGE and "--resume" in result.err and out.read_text() == "precious\n"


def test_ask_reads_the_question_from_stdin_or_a_file(cli, tiny_model, monkeypatch, tmp_path):
    import io

    video = asset(f"videos/{REAL[0]}")
    expected = json.loads(cli("ask", video, "What happens?", "-m", tiny_model, "-n", 4, "--json").out)["tokens"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("What happens?\n"))
    piped = cli("ask", video, "-", "-m", tiny_model, "-n", 4, "--json")
    assert json.loads(piped.out)["tokens"] == expected
    question = tmp_path / "q.txt"
    question.write_text("What happens?\n")
    from_file = cli("ask", video, "--prompt-file", question, "-m", tiny_model, "-n", 4, "--json", "--quiet")
    assert json.loads(from_file.out)["tokens"] == expected and from_file.err == ""


def test_a_failed_load_leaves_the_old_output_alone(cli, folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_text('{"video": "x"}\n')
    result = cli("caption", folder, "-m", tmp_path / "no-model", "--out", out, "--overwrite")
    assert result.code == Exit.MODEL and out.read_text() == '{"video": "x"}\n'
    fresh = tmp_path / "fresh.jsonl"
    assert cli("caption", folder, "-m", tmp_path / "no-model", "--out", fresh).code == Exit.MODEL
    assert not fresh.exists()


@pytest.mark.parametrize(
    "content, fmt, words",
    [
        ('{"video": "a.mp4"}\nnot json\n', "jsonl", ":2: not a videoqa record"),
        ('{"answer": "no video field"}\n', "jsonl", ":1: not a videoqa record"),
        (b"\xff\xfe\n", "jsonl", "not UTF-8"),
        ("name,size\na.mp4,3\n", "csv", "header"),
    ],
)
def test_resume_refuses_a_file_that_is_not_ours(cli, tiny_model, folder, tmp_path, content, fmt, words):
    out = tmp_path / f"other.{fmt}"
    out.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = out.read_bytes()
    result = cli("caption", folder, "-m", tiny_model, "--out", out, "--resume", "--format", fmt)
    assert result.code == Exit.USAGE and words in result.err and out.read_bytes() == before


def test_out_that_is_a_directory(cli, tiny_model, folder, tmp_path):
    result = cli("caption", folder, "-m", tiny_model, "--out", tmp_path)
    assert result.code == Exit.USAGE and "is a directory" in result.err


def test_resume_with_nothing_left_does_not_load_the_model(cli, tiny_model, folder, tmp_path, monkeypatch):
    out = tmp_path / "captions.jsonl"
    assert cli("caption", folder / REAL[0], "-m", tiny_model, "-n", 2, "--out", out).code == 0
    from videoqa import models

    monkeypatch.setattr(models, "load", lambda *a: pytest.fail("the model was loaded"))
    result = cli("caption", folder / REAL[0], "-m", tiny_model, "--out", out, "--resume")
    assert result.code == 0 and "skipped" in result.err and len(out.read_text().splitlines()) == 1


def copies(folder, count):
    """`count` distinct video files (copies: a link to a video is that video)."""
    paths = []
    for i in range(count):
        paths.append(folder / f"copy{i}.mp4")
        shutil.copy(asset(f"videos/{REAL[i % len(REAL)]}"), paths[-1])
    return paths


@pytest.mark.parametrize("count, batch", [(3, []), (5, ["-b", "8"])])
def test_a_partial_last_batch_is_captioned(cli, tiny_model, tmp_path, count, batch):
    videos = copies(tmp_path, count)
    result = cli("caption", *videos, "-m", tiny_model, "-n", 2, *batch)
    assert result.code == 0, result
    assert [json.loads(line)["video"] for line in result.out.splitlines()] == [str(v) for v in videos]


def test_out_that_is_one_of_the_inputs_is_refused(cli, tiny_model, tmp_path):
    first, second = copies(tmp_path, 2)
    before = first.read_bytes()
    result = cli("caption", first, second, "-m", tiny_model, "--out", first, "--overwrite")
    assert result.code == Exit.USAGE and "one of the videos" in result.err and result.out == ""
    assert first.read_bytes() == before
    folder = cli("caption", tmp_path, "-m", tiny_model, "--out", tmp_path / "copy1.mp4", "--overwrite")
    assert folder.code == Exit.USAGE and second.read_bytes() == asset(f"videos/{REAL[1]}").read_bytes()


def test_resume_after_a_prompt_with_line_separators(cli, tiny_model, folder, tmp_path):
    out, prompt = tmp_path / "captions.jsonl", "Describe\u2028this\u0085video."
    assert cli("caption", folder / REAL[0], "-m", tiny_model, "-n", 2, "-p", prompt, "--out", out).code == 0
    result = cli("caption", folder / REAL[0], folder / REAL[1], "-m", tiny_model, "-n", 2, "-p", prompt,
                 "--out", out, "--resume")
    assert result.code == 0, result
    assert [r["video"] for r in read_jsonl(out)] == [str(folder / REAL[0]), str(folder / REAL[1])]
    assert read_jsonl(out)[1]["question"] == prompt


def test_one_video_by_relative_and_absolute_path_is_captioned_once(cli, tiny_model, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder)
    out = tmp_path / "captions.jsonl"
    result = cli("caption", REAL[0], folder / REAL[0], f"./{REAL[0]}", "-m", tiny_model, "-n", 2, "--out", out)
    assert result.code == 0 and [r["video"] for r in read_jsonl(out)] == [REAL[0]]
    again = cli("caption", folder / REAL[0], "-m", tiny_model, "--out", out, "--resume")
    assert again.code == 0 and "skipped" in again.err and len(read_jsonl(out)) == 1


@pytest.mark.parametrize("glob", ["*.mp4,", "", "/videos/*.mp4"])
def test_glob_patterns_that_cannot_be_used(cli, tiny_model, folder, glob):
    assert_clean_failure(cli("caption", folder, "-m", tiny_model, "--glob", glob), Exit.USAGE, "--glob")


def test_out_dash_is_stdout(cli, tiny_model, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("caption", folder / REAL[0], "-m", tiny_model, "-n", 2, "--out", "-")
    assert result.code == 0 and json.loads(result.out)["video"] == str(folder / REAL[0])
    assert not (tmp_path / "-").exists()


def test_a_file_name_too_long_is_one_record(cli, tiny_model, folder, tmp_path):
    long = tmp_path / ("x" * 300 + ".mp4")
    result = cli("caption", folder / REAL[0], long, "-m", tiny_model, "-n", 2)
    assert result.code == Exit.SOME_FAILED, result
    records = [json.loads(line) for line in result.out.splitlines()]
    assert [r["video"] for r in records] == [str(folder / REAL[0]), str(long)]
    assert records[0]["error"] is None and records[1]["error"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_finish_the_batch_in_flight(tiny_model, folder, tmp_path, sig):
    copies(folder, 5)
    out = tmp_path / "captions.jsonl"
    process = caption_process(tiny_model, folder, out, "-b", "2", "-n", "400", "--glob", "*.mp4")
    wait_for_lines(out, 1, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    lines = out.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert len(lines) % 2 == 0 and len(lines) < 11  # whole batches of 2, and not all 11 videos
    assert b"done" in err and b"videos/s" in err  # the summary


def test_prompt_file_byte_order_mark_is_dropped(cli, tiny_model, tmp_path):
    question = tmp_path / "q.txt"
    question.write_bytes("\ufeffWhat happens?\n".encode())
    video = asset(f"videos/{REAL[0]}")
    record = json.loads(cli("ask", video, "--prompt-file", question, "-m", tiny_model, "-n", 4, "--json").out)
    plain = json.loads(cli("ask", video, "What happens?", "-m", tiny_model, "-n", 4, "--json").out)
    assert record["question"] == "What happens?" and record["tokens"] == plain["tokens"]
    captioned = cli("caption", video, "--prompt-file", question, "-m", tiny_model, "-n", 4)
    assert json.loads(captioned.out)["question"] == "What happens?"


def test_a_video_that_decodes_in_part_has_a_warning_in_its_record(cli, tiny_model, folder, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(asset(f"videos/{REAL[0]}").read_bytes()[:200_000])
    result = cli("caption", folder / REAL[0], cut, "-m", tiny_model, "-n", 2)
    assert result.code == 0, result
    whole, partial = [json.loads(line) for line in result.out.splitlines()]
    assert whole["warnings"] == [] and partial["error"] is None
    assert len(partial["warnings"]) == 1 and " of 243 frames decode" in partial["warnings"][0]
    assert f"note: {cut}: {partial['warnings'][0]}" in result.err


def test_links_pipes_and_names_that_are_no_utf8(cli, tiny_model, tmp_path):
    """A loop of links or a pipe in a folder gets its error record; two names that differ only in bytes that are
    not UTF-8 are two videos; a hard link to a video is refused as --out; an empty --out resumes."""
    clips = tmp_path / "clips"
    clips.mkdir()
    video = asset(f"videos/{REAL[0]}")
    shutil.copy(video, os.fsdecode(bytes(clips) + b"/caf\xe9.mp4"))
    shutil.copy(video, os.fsdecode(bytes(clips) + b"/caf\xe8.mp4"))
    (clips / "loop.mp4").symlink_to("loop.mp4")
    os.mkfifo(clips / "pipe.mp4")
    out = tmp_path / "c.jsonl"
    out.touch()  # what `kill -9` before the first record leaves
    result = cli("caption", clips, "-m", tiny_model, "-n", 2, "--frames", 2, "--out", out, "--resume")
    assert result.code == Exit.SOME_FAILED, result
    records = read_jsonl(out)
    assert sorted(r["video"].rsplit("/", 1)[1] for r in records) == ["caf\ufffd.mp4", "caf\ufffd.mp4", "loop.mp4",
                                                                       "pipe.mp4"]
    assert sorted(bool(r["error"]) for r in records) == [False, False, True, True]
    linked = tmp_path / "linked.jsonl"
    os.link(video_copy := shutil.copy(video, tmp_path / "v.mp4"), linked)
    before = linked.read_bytes()
    refused = cli("caption", video_copy, "-m", tiny_model, "-n", 2, "--out", linked, "--overwrite")
    assert_clean_failure(refused, Exit.USAGE, "one of the videos")
    assert linked.read_bytes() == before
