"""LLaVA-NeXT-Video and LLaVA-NeXT (images only): `ask` and `caption` token-identical to transformers' generate on
tiny random checkpoints with the real 336 px geometry, for 8 and 32 frames and images of several aspect ratios."""

import io
import json
import sys

import pytest
from PIL import Image

from conftest import assert_clean_failure, asset, needs_assets, reference_continue, reference_generate
from conftest import NEXT_IMAGE_PROMPT, reference_next_image
from videoqa.errors import Exit
from videoqa.frames import read_frames

VIDEO = "videos/videollava_sample_demo_1.mp4"
IMAGE = "images/videollava_extreme_ironing.jpg"
QUESTION = "What is shown in this video?"
# The prompts of the HF docs and chat templates, placeholder once; transformers' processor expands it.
IMAGE_PROMPTS = {
    "tiny_next_video": "USER: <image>\n{q} ASSISTANT:",
    "tiny_next": NEXT_IMAGE_PROMPT,
}


@needs_assets
@pytest.mark.parametrize("frames", [8, 32])
def test_video_tokens_equal_generate(cli, tiny_next_video, frames):
    path = asset(VIDEO)
    result = cli("ask", path, QUESTION, "-m", tiny_next_video, "-n", 12, "--frames", frames, "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    assert record["prompt"] == f"USER: <video>\n{QUESTION} ASSISTANT:"
    # 144 pooled positions per frame; 32 frames pass the 4096 positions of the text model, which its linear RoPE
    # scaling (x2) allows.
    assert record["timings"]["prefill_tokens"] == 19 - 1 + 144 * frames
    assert record["tokens"] == reference_generate(tiny_next_video, read_frames(path, frames), QUESTION, 12)


@needs_assets
def test_frame_count_changes_the_answer(cli, tiny_next_video):
    """The tiny model is sensitive enough to its frames for the equalities above to mean something."""
    answers = [json.loads(cli("ask", asset(VIDEO), QUESTION, "-m", tiny_next_video, "-n", 6, "-f", n, "--json").out)
               for n in (8, 32)]
    assert answers[0]["tokens"] != answers[1]["tokens"]


@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
    """A real 576x1024 portrait picture: a frame of a portrait video (the image assets are landscape or square)."""
    path = tmp_path_factory.mktemp("images") / "portrait.png"
    Image.fromarray(read_frames(asset("videos/llavanext_docs_jobs.mp4"), 1).pixels[0]).save(path)
    return path


def reference_image_answer(model_dir, image: Image.Image, text: str, max_new_tokens: int) -> tuple[list[int], list]:
    """transformers' own pipeline (conftest.reference_next_image's inputs), generate."""
    net, ids, inputs = reference_next_image(model_dir, image, text)
    return reference_continue(net, ids, max_new_tokens, **inputs), ids


@needs_assets
@pytest.mark.parametrize("model", ["tiny_next_video", "tiny_next"])
def test_image_tokens_equal_generate(cli, request, portrait, model):
    checkpoint = request.getfixturevalue(model)
    question = "What is unusual about this image?"
    images = [asset("images/videollava_waterview.jpg"), portrait, asset("images/videollava_sample_img_22.png")]
    answers, lengths = [], set()
    for path in images:  # landscape 1000x667, portrait 576x1024, square 225x225
        result = cli("ask", path, question, "-m", checkpoint, "-n", 8, "--json")
        assert result.code == 0, result
        record = json.loads(result.out)
        reference, ids = reference_image_answer(checkpoint, Image.open(path).convert("RGB"),
                                                IMAGE_PROMPTS[model].format(q=question), 8)
        assert record["tokens"] == reference, path
        assert record["timings"]["prefill_tokens"] == len(ids) and record["frames"] == []
        answers.append(record["tokens"])
        lengths.add(len(ids))
    assert len(lengths) == 3 and len({tuple(a) for a in answers}) > 1  # each shape its own grid; answers differ


@needs_assets
def test_caption_batch_equals_generate(cli, tiny_next_video):
    videos = [asset(VIDEO), asset("videos/videollava_sample_demo_3.mp4")]
    result = cli("caption", *videos, "-m", tiny_next_video, "-n", 6, "-b", 2, "--prompt", QUESTION)
    assert result.code == 0, result
    records = [json.loads(line) for line in result.out.splitlines()]
    for video, record in zip(videos, records):
        assert record["tokens"] == reference_generate(tiny_next_video, read_frames(video, 8), QUESTION, 6)


@needs_assets
def test_image_only_model_refuses_a_video(cli, tiny_next, monkeypatch):
    assert_clean_failure(cli("ask", asset(VIDEO), QUESTION, "-m", tiny_next), Exit.USAGE, "llava_next", "images only")
    assert_clean_failure(cli("caption", asset(VIDEO), "-m", tiny_next), Exit.USAGE, "images only")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {asset(VIDEO)}\n/image {asset(IMAGE)}\nWhy?\n"))
    chat = cli("chat", "-m", tiny_next, "-n", 2, "--json")  # the session goes on after the refused video
    assert chat.code == Exit.USAGE and "images only" in chat.err and len(json.loads(chat.out)["tokens"]) == 2


def test_presets_and_their_families():
    from videoqa.models import presets

    found = presets()
    names = {"llava-next-video-7b", "llava-next-video-7b-dpo", "llava-next-video-34b", "llava-v1.6-vicuna-7b"}
    assert names <= found.keys()
    for preset in found.values():
        assert "{media}" in preset.template and "{question}" in preset.template
        assert "{question}" in preset.followup and preset.frames >= 1
    assert {name: p.family.name for name, p in found.items() if name in names | {"video-llava-7b"}} == {
        "video-llava-7b": "video_llava", "llava-next-video-7b": "llava_next_video",
        "llava-next-video-7b-dpo": "llava_next_video", "llava-next-video-34b": "llava_next_video",
        "llava-v1.6-vicuna-7b": "llava_next",
    }
    assert found["llava-next-video-34b"].template.startswith("<|im_start|>system")  # ChatML, its own
    assert found["llava-next-video-7b"].template == "USER: {media}\n{question} ASSISTANT:"
