"""What a new user meets first: memory advice that fits (each way out checked by the same estimate), `videoqa models`
agreeing with `ask`, refusals that come before the memory check and any download, and the help and messages of
the command line."""

import json
import re

import pytest
import torch

from conftest import asset, assert_clean_failure, needs_assets, run_videoqa
from videoqa.errors import Exit
from videoqa.memory import parse_size, size

pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")
IMAGE = asset("images/videollava_desert.jpg")
QUESTION = "Why is this video funny?"
WAY = re.compile(r"(--dtype \S+|--quantize \S+|--frames \d+|-m \S+) \(~([0-9.]+ [MG]B)")


def ways(line: str) -> list[tuple[str, str]]:
    """The (change, figure) pairs an exit-8 line offers, in order."""
    return WAY.findall(line.split(": try ", 1)[1]) if ": try " in line else []


def checkpoint(model, **options):
    from videoqa.session import Checkpoint

    return Checkpoint(model, device="cpu", check_memory=False, cache=False, **options)


def figure(model, way: str, *, dtype: str, frames: int | None = None, new_tokens: int | None = None,
           medium: str = "video") -> float:
    """The estimate of the run the way out describes, computed through the API."""
    flag, value = way.split(" ", 1)
    options = {"dtype": value if flag == "--dtype" else dtype, "quantize": value if flag == "--quantize" else "none"}
    found = checkpoint(value if flag == "-m" else model, **options)
    frames = int(value) if flag == "--frames" else frames
    return found.estimate(frames=frames, max_new_tokens=new_tokens, medium=medium).total


def test_every_way_out_fits_the_budget_and_is_ranked(cli, tiny_model):
    """float32 over a budget between the bfloat16 and float32 estimates: bfloat16 comes first, each figure is the
    estimate of that run, each fits, and each, taken, passes the check."""
    found = checkpoint(tiny_model, dtype="float32")
    full = found.estimate(medium="video", max_new_tokens=2).total
    half = checkpoint(tiny_model, dtype="bfloat16").estimate(medium="video", max_new_tokens=2).total
    budget = f"{int((full + half) / 2)}B"
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--dtype", "float32", "--max-memory", budget, "-n", 2)
    assert_clean_failure(result, Exit.MEMORY, "needs", "--max-memory allows")
    offered = ways(result.err)
    assert offered and offered[0][0] == "--dtype bfloat16", result.err
    assert "slower than float32 on this CPU" in result.err  # the suite's CPU is one without native bfloat16
    for way, shown in offered:
        assert shown == size(figure(tiny_model, way, dtype="float32", new_tokens=2)), way
        assert figure(tiny_model, way, dtype="float32", new_tokens=2) <= parse_size(budget), way
    flag, value = offered[0][0].split(" ")
    taken = cli("ask", VIDEO, QUESTION, "-m", tiny_model, flag, value, "--max-memory", budget, "-n", 2, "--json")
    assert taken.code == 0, taken


def test_bfloat16_is_not_called_slow_where_the_cpu_computes_it(cli, tiny_model, monkeypatch):
    from videoqa import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    full, half = (checkpoint(tiny_model, dtype=dtype).estimate(medium="video").total for dtype in ("float32", "bfloat16"))
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--dtype", "float32", "--max-memory",
                 f"{int((full + half) / 2)}B")
    assert result.code == Exit.MEMORY and "--dtype bfloat16" in result.err and "slower" not in result.err


def test_the_most_frames_that_fit_are_offered(cli, tiny_model):
    """A budget between 3 and 4 frames' estimates (bfloat16, so that no smaller precision is offered): the most
    frames that fit, with their figure."""
    found = checkpoint(tiny_model, dtype="bfloat16")
    three, four = (found.estimate(frames=n, medium="video").total for n in (3, 4))
    budget = int((three + four) / 2)
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--dtype", "bfloat16", "--max-memory", f"{budget}B")
    offered = dict(ways(result.err))
    assert "--dtype float16" not in offered and "--frames 3" in offered, result.err
    assert offered["--frames 3"] == size(three)
    assert list(offered).index("--frames 3") == len(offered) - 1  # after precisions and quantization


def test_nothing_fits_is_said_plainly(cli, tiny_model):
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--max-memory", "1MB")
    assert_clean_failure(result, Exit.MEMORY, "nothing fits")
    assert "try" not in result.err and "nf4" not in result.err  # nf4 (~228 MB) needs more than the 173 MB model


def unreachable_hub(tmp_path) -> dict:
    """A process that would download (not offline, an empty cache) from a hub that refuses at once."""
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"),
            "XDG_CACHE_HOME": str(tmp_path / "cache")}


def one_line(process) -> str:
    err = process.stderr.decode()
    assert process.stdout == b"" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_preset_that_does_not_fit_names_the_presets_that_do(tmp_path):
    result = run_videoqa("ask", VIDEO, QUESTION, "--dtype", "float32", "--max-memory", "6GB",
                         env=unreachable_hub(tmp_path))
    assert result.returncode == Exit.MEMORY
    offered = ways(one_line(result))
    assert offered, result.stderr
    for way, shown in offered:
        assert way.startswith("-m ") and shown == size(figure("video-llava-7b", way, dtype="float32")), way
        assert figure("video-llava-7b", way, dtype="float32") <= 6e9
    assert ("-m llava-onevision-0.5b", size(figure("video-llava-7b", "-m llava-onevision-0.5b", dtype="float32"))) \
        in offered
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())  # nothing downloaded


def test_models_agrees_with_ask(tmp_path):
    """For each preset, `models` says whether a default question fits a budget; `ask` then passes the memory check
    (and fails to reach the hub: exit 4) exactly where it said so, and stops with exit 8 elsewhere."""
    env = unreachable_hub(tmp_path)
    listed = run_videoqa("models", "--json", "--max-memory", "6GB", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.decode().splitlines()]
    assert {row["auto"] for row in rows} <= {"bfloat16", "float32"} and len({row["auto"] for row in rows}) == 1
    assert {False, True} == {row["default_fits"] for row in rows}  # the budget splits the presets
    for row in rows:
        int4 = [] if torch.cuda.is_available() else ["int4"]  # int4 runs on a CPU only
        assert list(row["memory_bytes"]) == ["float32", "float16", "bfloat16", "int8", *int4, "nf4"]
        assert row["default_fits"] == row["fits"][row["auto"]]
        medium = VIDEO if row["name"] not in ("llava-1.5-7b", "llava-v1.6-vicuna-7b") else IMAGE
        asked = run_videoqa("ask", medium, QUESTION, "-m", row["name"], "--max-memory", "6GB", env=env)
        assert asked.returncode == (Exit.MODEL if row["default_fits"] else Exit.MEMORY), (row["name"], asked.stderr)
    table = run_videoqa("models", "--max-memory", "6GB", env=env).stdout.decode()
    header = next(line for line in table.splitlines() if "preset" in line)
    assert header.count("(auto)") == 1 and f"{rows[0]['auto']} (auto)" in header
    for name in ("float32", "float16", "bfloat16", "int8", "int4", "nf4", "ask"):
        assert name in header


def test_frames_past_the_context_are_refused_before_the_memory_check(cli, tiny_model):
    for frames in (1_000_000, 10**30):
        result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", frames, "--max-memory", "1MB")
        assert_clean_failure(result, Exit.USAGE, f"--frames {frames}", "at most 819 frames")


def test_a_preset_is_refused_for_frames_and_videos_before_any_download(tmp_path):
    env = unreachable_hub(tmp_path)
    frames = run_videoqa("ask", VIDEO, QUESTION, "--frames", 1_000_000, env=env)
    assert frames.returncode == Exit.USAGE and "at most 15 frames" in one_line(frames)  # 4096 // 257 per frame
    for command in ("ask", "caption"):
        image_only = run_videoqa(command, VIDEO, *([QUESTION] if command == "ask" else []), "-m", "llava-1.5-7b",
                                 env=env)
        assert image_only.returncode == Exit.USAGE and "images only" in one_line(image_only)
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())


def test_an_image_question_does_not_count_frames(cli, tiny_model):
    small = cli("ask", IMAGE, QUESTION, "-m", tiny_model, "--max-memory", "1MB")
    many = cli("ask", IMAGE, QUESTION, "-m", tiny_model, "--max-memory", "1MB", "--frames", 1_000_000)
    assert small.code == many.code == Exit.MEMORY and small.err == many.err
    answered = cli("ask", IMAGE, QUESTION, "-m", tiny_model, "--frames", 1_000_000, "-n", 2, "--json")
    assert answered.code == 0, answered
    found = checkpoint(tiny_model, dtype="float32")
    assert found.estimate(medium="image", frames=1_000_000).total == found.estimate(medium="image").total


def test_an_unreachable_hub_is_named_with_its_cause(tmp_path):
    result = run_videoqa("ask", VIDEO, QUESTION, "-m", "llava-onevision-0.5b", env=unreachable_hub(tmp_path))
    line = one_line(result)
    assert result.returncode == Exit.MODEL
    assert "cannot reach the Hugging Face hub: " in line and "Connection refused" in line
    assert "HF_HUB_OFFLINE" not in line
    offline = run_videoqa("ask", VIDEO, QUESTION, "-m", "llava-onevision-0.5b",
                          env={**unreachable_hub(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == Exit.MODEL and "HF_HUB_OFFLINE is set" in one_line(offline)


def test_a_file_as_the_model_and_a_url_as_the_video(cli):
    assert_clean_failure(cli("ask", VIDEO, QUESTION, "-m", IMAGE), Exit.MODEL, "is a file, not a model directory")
    for url in ("https://example.com/clip.mp4", "s3://bucket/videos/clip.mp4"):
        assert_clean_failure(cli("ask", url, QUESTION), Exit.INPUT, url, "URLs are not read; download the file first")


def test_an_answer_cut_by_the_context_says_so(cli, tiny_model):
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 100_000, "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    allowed = 4096 - record["timings"]["prefill_tokens"]  # the tiny model's context less the prompt
    warning = next(w for w in record["warnings"] if "--max-new-tokens 100000" in w)
    assert f"at most {allowed} tokens" in warning and warning in result.err
    assert len(record["tokens"]) <= allowed
    short = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 3, "--json").out)
    assert short["warnings"] == []


def test_a_bad_choice_is_one_plain_line(cli):
    result = cli("ask", VIDEO, QUESTION, "--format", "xml")
    assert_clean_failure(result, Exit.USAGE, "--format", "'xml'", "'text', 'json'")
    assert "Value error" not in result.err


def test_no_command_lists_every_command_and_version(cli):
    from videoqa import __version__
    from videoqa.cli import app

    import typer

    result = cli()
    assert_clean_failure(result, Exit.USAGE, *typer.main.get_command(app).commands)
    assert "models" in result.err
    version = cli("--version")
    assert version.code == 0 and version.out == f"videoqa {__version__}\n"


@pytest.mark.parametrize("command", ["", "ask", "chat", "caption", "timeline", "find", "models", "cache"])
def test_help_shows_no_bare_bool_and_whole_defaults(cli, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    result = cli(*([command] if command else []), "--help")
    assert result.code == 0 and "Usage" in result.out
    assert "<bool>" not in result.out
    if command == "caption":
        assert "*.wmv" in result.out and "…" not in result.out


def test_eta_waits_for_finished_work():
    from videoqa.render import eta

    assert eta(None, 0, 15) == eta(3.0, 0, 15) == "ETA -:--:--"  # nothing finished: no estimate
    assert eta(5.0, 2, 15) == "ETA 0:00:32"  # 2.5 s each, 13 left
    assert eta(3700.0, 1, 2) == "ETA 1:01:40"
    assert eta(40.0, 4, 4) == "ETA 0:00:00"
