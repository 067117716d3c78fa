"""`videoqa ask` end to end: token-identical to transformers' generate, JSON output, sampling."""

import json

import pytest

from conftest import asset, needs_assets, reference_generate
from videoqa.frames import read_frames

pytestmark = needs_assets

CASES = [
    ("videollava_sample_demo_1.mp4", "Why is this video funny?"),
    ("videollava_sample_demo_3.mp4", "Can you identify any safety hazards in this video?"),
    ("videollama2_1034346401.mp4", "What is this young woman doing?"),
    ("llavanext_docs_jobs.mp4", "Describe the video in details."),
]


@pytest.mark.parametrize("video, question", CASES)
def test_greedy_tokens_equal_transformers_generate(cli, tiny_model, video, question):
    path = asset(f"videos/{video}")
    result = cli("ask", path, question, "--model", tiny_model, "--max-new-tokens", 24, "--json")
    assert result.code == 0, result
    ours = json.loads(result.out)
    assert ours["tokens"] == reference_generate(tiny_model, read_frames(path, 8), question, 24)


def test_frame_count_changes_the_answer_as_in_the_reference(cli, tiny_model):
    path = asset("videos/videollava_sample_demo_9.mp4")
    result = cli("ask", path, "Describe the video.", "-m", tiny_model, "-n", 16, "--frames", 3, "--json")
    ours = json.loads(result.out)
    assert [f["index"] for f in ours["frames"]] == [0, 109, 218]  # linspace(0, 218, 3)
    assert ours["tokens"] == reference_generate(tiny_model, read_frames(path, 3), "Describe the video.", 16)


def test_json_record_fields(cli, tiny_model):
    path = asset("videos/videollava_sample_demo_1.mp4")
    result = cli("ask", path, "Why is this video funny?", "-m", tiny_model, "-n", 5, "--json")
    record = json.loads(result.out)
    assert result.out.count("\n") == 1
    assert result.err == ""  # nothing but errors on stderr when it is not a terminal
    assert set(record) == {"answer", "tokens", "frames", "model", "video", "question", "prompt", "runtime", "timings",
                           "warnings", "error"}
    assert record["runtime"] == {"device": "cpu", "dtype": "float32", "quantize": "none"}
    assert record["warnings"] == []  # a video that decodes whole
    assert record["prompt"] == "USER: <video>\nWhy is this video funny? ASSISTANT:" and record["error"] is None
    assert record["frames"][1] == {"index": 34, "time": pytest.approx(34 / 25, abs=1e-3)}
    assert record["video"] == str(path) and record["question"] == "Why is this video funny?"
    assert record["model"] == str(tiny_model)
    assert len(record["tokens"]) == 5
    assert set(record["timings"]) == {"load", "frames", "vision", "prefill", "decode", "decode_tokens_per_s", "prefill_tokens"}
    assert all(v >= 0 for v in record["timings"].values())


def test_streamed_text_is_the_decoded_answer(cli, tiny_model):
    path = asset("videos/videollava_sample_demo_1.mp4")
    streamed = cli("ask", path, "Why is this video funny?", "-m", tiny_model, "-n", 12)
    record = json.loads(cli("ask", path, "Why is this video funny?", "-m", tiny_model, "-n", 12, "--json").out)
    assert streamed.code == 0 and streamed.out == record["answer"] + "\n"


def test_answer_stops_at_eos(cli, tiny_model, monkeypatch):
    """Make EOS the likeliest token after the first step: the answer is [t, 2] and stops."""
    from videoqa import decode

    real_forward = decode.forward
    calls = []

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out.logits[:, 2] = 1e4
        return out

    monkeypatch.setattr(decode, "forward", forward)
    path = asset("videos/videollava_sample_demo_1.mp4")
    record = json.loads(cli("ask", path, "Why?", "-m", tiny_model, "-n", 50, "--json").out)
    assert len(record["tokens"]) == 2 and record["tokens"][-1] == 2


def sampled(cli, model, seed):
    path = asset("videos/videollava_sample_demo_1.mp4")
    args = ["ask", path, "Why?", "-m", model, "-n", 8, "--temperature", 1.0, "--json"]
    return json.loads(cli(*args, *(["--seed", seed] if seed is not None else [])).out)["tokens"]


def test_sampling_is_reproducible_with_a_seed_and_differs_across_seeds(cli, tiny_model):
    assert sampled(cli, tiny_model, 1) == sampled(cli, tiny_model, 1)
    assert sampled(cli, tiny_model, 1) != sampled(cli, tiny_model, 2)


def test_zero_new_tokens_gives_an_empty_answer(cli, tiny_model):
    path = asset("videos/videollava_sample_demo_1.mp4")
    record = json.loads(cli("ask", path, "Why?", "-m", tiny_model, "-n", 0, "--json").out)
    assert record["tokens"] == [] and record["answer"] == ""


@pytest.mark.parametrize(
    "video",
    [
        "decord_flipping_a_pancake.mkv",  # the container reports 0 frames
        "edge_cases/decord_video_90.mov",  # rotated, 3 frames < 8 asked
        "edge_cases/decord_video_180.mov",
        "edge_cases/decord_unordered.mov",  # timestamps out of order
        "edge_cases/decord_corrupted.mp4",  # only the first 28 of 50 frames decode
        "videollava_sample_demo_22.mp4",  # portrait
        "videollava_assets_demo.mp4",  # 2048x1810
    ],
)
def test_awkward_but_valid_videos_get_an_answer(cli, tiny_model, video):
    result = cli("ask", asset(f"videos/{video}"), "What happens?", "-m", tiny_model, "-n", 3, "--json")
    assert result.code == 0, result
    assert len(json.loads(result.out)["tokens"]) == 3


@pytest.mark.parametrize("temperature", ["1e-40", "1e-200", "5e-324"])  # the last two are 0 in float32
def test_a_temperature_near_zero_samples_the_greedy_answer(cli, tiny_model, temperature):
    path = asset("videos/videollava_sample_demo_1.mp4")
    greedy = json.loads(cli("ask", path, "Why?", "-m", tiny_model, "-n", 8, "--json").out)
    tiny = cli("ask", path, "Why?", "-m", tiny_model, "-n", 8, "--json", "-t", temperature, "--seed", 3)
    assert tiny.code == 0, tiny
    assert json.loads(tiny.out)["tokens"] == greedy["tokens"]


def test_format_json_is_json(cli, tiny_model):
    path = asset("videos/videollava_sample_demo_1.mp4")
    shown = json.loads(cli("ask", path, "Why?", "-m", tiny_model, "-n", 4, "--format", "json").out)
    assert shown["tokens"] == json.loads(cli("ask", path, "Why?", "-m", tiny_model, "-n", 4, "--json").out)["tokens"]
    text = cli("ask", path, "Why?", "-m", tiny_model, "-n", 4, "--format", "text")
    assert text.out == shown["answer"] + "\n"


def test_a_video_that_decodes_in_part_is_answered_with_a_warning(cli, tiny_model, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(asset("videos/videollava_sample_demo_1.mp4").read_bytes()[:200_000])  # the header says 243
    result = cli("ask", cut, "What happens?", "-m", tiny_model, "-n", 2, "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    [warning] = record["warnings"]
    assert warning.startswith("only ") and " of 243 frames decode (0.00–" in warning and warning.endswith(" of 9.7 s)")
    assert result.err == f"note: {cut}: {warning}\n"  # and a note on stderr
    assert max(f["index"] for f in record["frames"]) < 30
