"""`videoqa find`: each segment's score P(yes) / (P(yes) + P(no)) equals the one computed from transformers' own
forward on the same frames and prompt; the yes/no ids are those the tokenizer gives the answer after the template."""

from __future__ import annotations

import json
import re

import pytest

import videoqa
from conftest import (assert_clean_failure, asset, build_video_llava, needs_assets, reference_net, reference_pixels, reference_prompt,
                      tiny)
from videoqa.errors import Exit
from videoqa.frames import read_frames
from videoqa.windows import window

pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")  # 9.72 s
QUERY = "a baby reading a book"
QUESTION = "Does this part of the video show: a baby reading a book? Answer yes or no."


def build_opinionated(directory):
    """Larger weights than the default initialisation: the next-token distribution, and so the scores, then differ
    visibly from segment to segment (with the default, every score is 0.5 to a few decimals)."""
    return build_video_llava(directory, initializer_range=0.5)


@pytest.fixture(scope="module")
def opinionated(tmp_path_factory):
    return tiny(tmp_path_factory, build_opinionated)


def reference_score(net, tokenizer, frames) -> float:
    """transformers' forward on the processor-style prompt and CLIPImageProcessorPil pixels; softmax of the last
    position; P(" Yes") / (P(" Yes") + P(" No"))."""
    import torch

    ids = torch.tensor([reference_prompt(net, tokenizer, frames, QUESTION)])
    pixels = reference_pixels(net, list(frames.pixels))[None]
    with torch.no_grad():
        probs = net(input_ids=ids, pixel_values_videos=pixels).logits[0, -1].float().softmax(-1)
    yes, no = tokenizer.convert_tokens_to_ids(["▁Yes", "▁No"])
    return (probs[yes] / (probs[yes] + probs[no])).item()


def test_scores_equal_a_reference_forward(cli, opinionated):
    result = cli("find", VIDEO, QUERY, "-m", opinionated, "--every", "2", "--json", "-b", "3")
    assert result.code == 0, result
    found = json.loads(result.out)
    assert found["query"] == QUERY and found["video"] == str(VIDEO)
    segments = found["segments"]
    assert [(s["start"], s["end"]) for s in segments] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9.72)]
    net, tokenizer = reference_net(opinionated)
    for segment in segments:
        frames = read_frames(VIDEO, 8, window=window(segment["start"], segment["end"]))
        assert [f["index"] for f in segment["frames"]] == frames.indices
        assert abs(segment["score"] - reference_score(net, tokenizer, frames)) < 1e-5
    assert max(s["score"] for s in segments) - min(s["score"] for s in segments) > 1e-3  # the test can tell them apart


def test_top_k_best_first_and_batching_changes_no_score(cli, opinionated):
    every = json.loads(cli("find", VIDEO, QUERY, "-m", opinionated, "--every", "2", "--json", "-b", "1").out)
    batched = json.loads(cli("find", VIDEO, QUERY, "-m", opinionated, "--every", "2", "--json", "-b", "5").out)
    assert [s["score"] for s in every["segments"]] == pytest.approx([s["score"] for s in batched["segments"]],
                                                                   abs=1e-6)
    shown = cli("find", VIDEO, QUERY, "-m", opinionated, "--every", "2", "--top", "2")
    assert shown.code == 0 and shown.err == ""
    best = sorted(every["segments"], key=lambda s: -s["score"])[:2]
    clock = {0: "00:00", 2: "00:02", 4: "00:04", 6: "00:06", 8: "00:08", 9.72: "00:09.720"}
    assert shown.out.splitlines() == [f"{clock[s['start']]}–{clock[s['end']]}  {s['score']:.2f}" for s in best]
    assert all(re.fullmatch(r"\d\d:\d\d(\.\d{3})?–\d\d:\d\d(\.\d{3})?  [01]\.\d\d", line) for line in shown.out.splitlines())


@pytest.mark.parametrize("model", ["tiny_model", "tiny_next_video"])
def test_yes_and_no_are_the_tokens_after_the_template(request, model):
    """Vicuna templates end in `ASSISTANT:`; the Llama-2 tokenizer encodes the answer after it as "▁Yes" (3869) and
    "▁No" (1939), whichever family: the ids the README gives."""
    loaded = videoqa.load(request.getfixturevalue(model), device="cpu", dtype="float32", cache=False)
    assert loaded.answer_ids == (3869, 1939)
    assert loaded.tokenizer.convert_ids_to_tokens([3869, 1939]) == ["▁Yes", "▁No"]


def test_the_api_and_segments(tiny_model):
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    found = model.find(VIDEO, QUERY, count=3, frames=4)
    assert [(s["start"], s["end"]) for s in found] == [(0, 3.24), (3.24, 6.48), (6.48, 9.72)]
    assert all(0 < s["score"] < 1 and len(s["frames"]) == 4 and s["error"] is None for s in found)
    assert len(model.find(VIDEO, QUERY)) == 1  # 10 s segments by default: one for 9.72 s


def test_usage(cli, tiny_model, tmp_path):
    both = cli("find", VIDEO, QUERY, "-m", tiny_model, "--every", "2", "--segments", "2")
    assert both.code == Exit.USAGE and "give one of them" in both.err and both.out == ""
    assert cli("find", VIDEO, " ", "-m", tiny_model).code == Exit.USAGE  # an empty query
    assert cli("find", tmp_path / "nope.mp4", QUERY, "-m", tiny_model).code == Exit.INPUT
    assert "--temperature" not in cli("find", "--help").out  # find generates no text: only --frames of the settings


def test_segments_that_cannot_be_read_are_said_on_stderr(cli, tiny_model, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(VIDEO.read_bytes()[:200_000])  # 28 frames' packets, 25 decode (0.00–1.00 s): 1.00–1.12 s fails
    some = cli("find", cut, QUERY, "-m", tiny_model, "--frames", 2, "--every", "0.5")
    assert some.code == Exit.SOME_FAILED and len(some.out.splitlines()) == 2
    assert "error: 1 of 3 segments could not be scored; 00:01–00:01.120:" in some.err
    nothing = tmp_path / "nothing.mp4"
    nothing.write_bytes(VIDEO.read_bytes()[:30_000])  # no frame decodes: refused as ask refuses it
    assert_clean_failure(cli("find", nothing, QUERY, "-m", tiny_model), Exit.INPUT, "no frame decodes")
    image = asset("images/videollava_desert.jpg")
    assert_clean_failure(cli("find", image, QUERY, "-m", tiny_model), Exit.USAGE, "still image, not a video")


def test_after_a_chatml_template_the_answer_has_no_leading_space(tmp_path_factory):
    """OneVision's template ends with "assistant\n": the answer's first token is that of "Yes" / "No" as such, not
    of " Yes" (with the real Qwen2 tokenizer, 9454 and 2753; the tiny one here spells them in smaller pieces)."""
    from onevision_fixtures import build_llava_onevision

    model = videoqa.load(build_llava_onevision(tmp_path_factory.mktemp("onevision")), device="cpu", dtype="float32",
                         cache=False)
    yes, no = model.answer_ids
    assert model.preset.template.endswith("assistant\n")
    shown = model.tokenizer.decode([yes]), model.tokenizer.decode([no])
    assert "Yes".startswith(shown[0]) and "No".startswith(shown[1]) and shown[0] and shown[1]
    found = model.find(VIDEO, QUERY, count=2, frames=2)
    assert [s["error"] for s in found] == [None, None] and all(0 < s["score"] < 1 for s in found)
