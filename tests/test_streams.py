"""Real processes with the streams a shell can hand over: closed, full, a reader that goes away, bytes that are
not UTF-8 under a strict locale, file names that are not UTF-8. Never a traceback or exit 1."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import asset, needs_assets, run_videoqa
from videoqa.errors import Exit

pytestmark = needs_assets
VIDEO = "videos/videollava_sample_demo_1.mp4"
STRICT = {"PYTHONIOENCODING": "utf-8:strict"}  # what a strict UTF-8 locale (en_US.UTF-8) gives Python's streams


def one_error_line(err: bytes, *words: str) -> None:
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def close_fd(fd: int):
    return lambda: os.close(fd)


def test_stdout_on_a_full_disk_is_a_usage_error(tiny_model):
    with open("/dev/full", "w") as full:
        result = run_videoqa("ask", asset(VIDEO), "Why?", "-m", tiny_model, "-n", 3, stdout=full)
    assert result.returncode == Exit.USAGE
    one_error_line(result.stderr, "stdout", "No space left on device")


def test_chat_on_a_full_disk_stops_at_the_first_answer(tiny_model):
    with open("/dev/full", "w") as full:
        result = run_videoqa("chat", asset(VIDEO), "-m", tiny_model, "-n", 2, input=b"a\nb\nc\n", stdout=full)
    assert result.returncode == Exit.USAGE
    one_error_line(result.stderr, "stdout", "No space left on device")  # once, not once per question


def test_caption_out_on_a_full_disk_is_a_usage_error(tiny_model):
    result = run_videoqa("caption", asset(VIDEO), "-m", tiny_model, "-n", 2, "--out", "/dev/full")
    assert result.returncode == Exit.USAGE and result.stdout == b""
    one_error_line(result.stderr, "/dev/full", "No space left on device")


@pytest.mark.parametrize("command", [["ask", asset(VIDEO), "Why?", "-n", "3"], ["cache", "info"]])
def test_closed_stdout_is_a_usage_error(tiny_model, command):
    model = ["-m", tiny_model] if command[0] == "ask" else []
    result = run_videoqa(*command, *model, stdout=None, preexec_fn=close_fd(1))
    assert result.returncode == Exit.USAGE
    one_error_line(result.stderr, "stdout", "closed")


def test_closed_stdin_with_dash_as_the_question(tiny_model):
    result = run_videoqa("ask", asset(VIDEO), "-", "-m", tiny_model, stdin=None, preexec_fn=close_fd(0))
    assert result.returncode == Exit.USAGE and result.stdout == b""
    one_error_line(result.stderr, "stdin is closed")


def test_closed_stdin_for_chat(tiny_model):
    result = run_videoqa("chat", asset(VIDEO), "-m", tiny_model, stdin=None, preexec_fn=close_fd(0))
    assert result.returncode == Exit.USAGE and result.stdout == b""
    one_error_line(result.stderr, "stdin is closed")


@pytest.mark.parametrize("command", [["ask", asset(VIDEO), "Why?", "--json"], ["caption", asset(VIDEO)]])
def test_a_reader_that_goes_away_ends_the_run_quietly(tiny_model, command):
    """As `| head -1` does once it has its line: here the reader is gone before the first byte is written."""
    process = subprocess.Popen([sys.executable, "-m", "videoqa", *map(str, command), "-m", str(tiny_model), "-n", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=300) == Exit.PIPE and err == b""


def test_head_c1_gets_its_byte_and_no_traceback(tiny_model):
    shell = f"{sys.executable} -m videoqa ask {asset(VIDEO)} Why? -m {tiny_model} -n 40 | head -c1"
    result = subprocess.run(["bash", "-c", f"{shell}; echo \" ${{PIPESTATUS[0]}}\""], capture_output=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    first, code = result.stdout.decode().rsplit(" ", 1)
    assert len(first) == 1 and int(code) in (0, Exit.PIPE) and b"Traceback" not in result.stderr


def test_question_that_is_not_utf8_under_a_strict_locale(tiny_model):
    result = run_videoqa("ask", asset(VIDEO), "-", "-m", tiny_model, input=b"\xff\xfe?\n", env=STRICT)
    assert result.returncode == Exit.USAGE and result.stdout == b""
    one_error_line(result.stderr, "UTF-8")


@pytest.fixture
def odd_name(tmp_path):
    """A real video under a file name that is not valid UTF-8."""
    path = os.path.join(os.fsencode(tmp_path), b"clip\xff\xfe.mp4")
    shutil.copy(asset(VIDEO), path)
    return os.fsdecode(path)


def test_file_names_that_are_not_utf8_give_valid_json(tiny_model, odd_name):
    """Under a strict UTF-8 locale (ask) and C.UTF-8, where Python writes undecodable names back as raw bytes."""
    result = run_videoqa("ask", odd_name, "Why?", "-m", tiny_model, "-n", 3, "--json", env=STRICT)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.decode("utf-8"))  # strict: valid UTF-8
    assert record["video"].endswith("clip\ufffd\ufffd.mp4") and len(record["tokens"]) == 3

    captioned = run_videoqa("caption", odd_name, asset(VIDEO), "-m", tiny_model, "-n", 3, env={"LC_ALL": "C.UTF-8"})
    assert captioned.returncode == 0, captioned.stderr
    records = [json.loads(line) for line in captioned.stdout.decode("utf-8").splitlines()]
    assert records[0]["video"] == record["video"] and records[0]["tokens"] == record["tokens"]
    assert records[1]["tokens"] == record["tokens"]  # the same video under its own name
