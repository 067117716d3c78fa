"""Mixed media (both model docs' "Mixed Media Mode") on the LLaVA families: `ask VIDEO Q --with IMAGE` and the
two-turn image-then-video chat (`/add`) give transformers' `generate` tokens on the same ids with both image and
video pixel inputs; a later turn prefills only itself and encodes only the new file; an image-only family refuses
a video before loading (ask) or with one error line that keeps the session (chat); the context and memory checks
count every file. (The Qwen, SmolVLM2 and OneVision checks are in their own test files.)"""

import json

import pytest

import videoqa
from conftest import (asset, assert_clean_failure, build_video_llava, needs_assets, reference_continue,
                      reference_net, reference_pixels)
from videoqa.errors import Exit
from videoqa.frames import read_frames

pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")
IMAGE = asset("images/videollava_desert.jpg")
Q1, Q2 = "How many cats are there in the image?", "Why is this video funny?"


def placeholders(net, tokenizer, image) -> tuple[str, str, dict]:
    """The image's and an 8-frame video's placeholders as transformers' processors expand them, and the image's
    pixel inputs: Video-LLaVA's image drops CLS (CLIPImageProcessorPil pixels), LLaVA-NeXT-Video's is AnyRes
    (LlavaNextProcessor counts its placeholders: it is the same code LlavaNextVideoProcessor runs for images)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    vision = net.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if net.config.model_type == "video_llava":
        return "<image>" * patches, "<video>" * 8 * (patches + 1), {
            "pixel_values_images": reference_pixels(net, [image])}
    size = vision.image_size
    pixels = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                        image_grid_pinpoints=net.config.image_grid_pinpoints)
    processor = LlavaNextProcessor(pixels, tokenizer, patch_size=vision.patch_size, num_additional_image_tokens=1,
                                   vision_feature_select_strategy=net.config.vision_feature_select_strategy)
    inputs = processor(images=image, text="<image>", return_tensors="pt")
    count = inputs.input_ids[0].tolist().count(tokenizer.convert_tokens_to_ids("<image>"))
    return "<image>" * count, "<video>" * 8 * (patches // 4), {
        "pixel_values": inputs.pixel_values, "image_sizes": inputs.image_sizes}


@pytest.fixture(scope="module", params=["tiny_model", "tiny_next_video"])
def family(request):
    """A LLaVA family that takes both kinds, with transformers' inputs for IMAGE and VIDEO's 8 frames."""
    from PIL import Image

    checkpoint = request.getfixturevalue(request.param)
    net, tokenizer = reference_net(checkpoint)
    image, video, inputs = placeholders(net, tokenizer, Image.open(IMAGE).convert("RGB"))
    videos = reference_pixels(net, list(read_frames(VIDEO, 8).pixels))[None]
    return checkpoint, net, tokenizer, image, video, inputs, {"pixel_values_videos": videos}


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_ask_with_an_image_equals_generate_with_both_pixel_inputs(cli, family):
    checkpoint, net, tokenizer, image, video, images, videos = family
    result = cli("ask", VIDEO, "Is the person in the photo in the video?", "--with", IMAGE, "-m", checkpoint,
                 "-n", 8, "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    # the LLaVA chat templates render a turn's images first, then its videos, each on its own line
    assert record["prompt"] == "USER: <image>\n<video>\nIs the person in the photo in the video? ASSISTANT:"
    assert record["media"] == [str(VIDEO), str(IMAGE)] and record["video"] == str(VIDEO)
    assert len(record["frames"]) == 8
    ids = [1, *ids_of(tokenizer, f"USER: {image}\n{video}\nIs the person in the photo in the video? ASSISTANT:")]
    assert record["tokens"] == reference_continue(net, ids, 8, **images, **videos)
    assert len(set(record["tokens"])) > 1  # not one token repeated: the comparison has teeth
    alone = json.loads(cli("ask", VIDEO, "Is the person in the photo in the video?", "-m", checkpoint, "-n", 8,
                           "--json").out)
    assert alone["tokens"] != record["tokens"]  # the image is part of what the answer depends on


def test_the_api_takes_a_list_of_files(family):
    checkpoint, net, tokenizer, image, video, images, videos = family
    model = videoqa.load(checkpoint, device="cpu", dtype="float32", cache=False)
    answer = model.ask([VIDEO, IMAGE], "Is the person in the photo in the video?", max_new_tokens=6)
    ids = [1, *ids_of(tokenizer, f"USER: {image}\n{video}\nIs the person in the photo in the video? ASSISTANT:")]
    assert answer.tokens == reference_continue(net, ids, 6, **images, **videos)
    assert answer.media == [VIDEO, IMAGE]


def test_an_image_then_a_video_in_one_conversation_equals_generate(chat, family, counted):
    checkpoint, net, tokenizer, image, video, images, videos = family
    result = chat([Q1, f"/add {VIDEO}", Q2], IMAGE, "-m", checkpoint, "-n", 8, "--json")
    assert result.code == 0, result
    first, second = (json.loads(line) for line in result.out.splitlines())
    assert "added video" in result.err and "8 frames" in result.err
    assert counted["towers"] == [8]  # the video through the tower once; the image's features kept from turn 1
    assert second["prompt"] == f"USER: <video>\n{Q2} ASSISTANT:" and second["turn"] == 2
    assert second["media"] == [str(IMAGE), str(VIDEO)] and len(second["frames"]) == 8 and first["frames"] == []

    prompt = [1, *ids_of(tokenizer, f"USER: {image}\n{Q1} ASSISTANT:")]
    assert first["tokens"] == reference_continue(net, prompt, 8, **images)
    # the docs' conversation: `USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: <video>\n{q2} ASSISTANT:`
    eos = [2] if first["tokens"][-1] != 2 else []
    whole = [*prompt, *first["tokens"], *eos, *ids_of(tokenizer, f"USER: {video}\n{Q2} ASSISTANT:")]
    assert second["tokens"] == reference_continue(net, whole, 8, **images, **videos)
    assert len(set(second["tokens"])) > 1
    # the cache held turn 1 (all but its last answer token): turn 2 prefilled only what follows
    assert second["timings"]["prefill_tokens"] == len(whole) - (len(prompt) + len(first["tokens"]) - 1)


def test_an_image_only_family_refuses_a_video_before_loading(cli, tiny_next):
    assert_clean_failure(cli("ask", IMAGE, "What is this?", "--with", VIDEO, "-m", tiny_next), Exit.USAGE,
                         "still images only")
    # a preset not downloaded: refused before anything is looked for (offline, nothing cached: no exit 4)
    assert_clean_failure(cli("ask", IMAGE, "What is this?", "--with", VIDEO, "-m", "llava-1.5-7b"), Exit.USAGE,
                         "llava-1.5-7b", "still images only")
    assert_clean_failure(cli("ask", VIDEO, "What?", "--with", IMAGE, "--explain", "-m", tiny_next), Exit.USAGE,
                         "--explain", "--with")


def test_an_image_only_family_in_chat_says_so_and_keeps_the_conversation(chat, tiny_next):
    result = chat(["What is this?", f"/add {VIDEO}", "And the colours?"], IMAGE, "-m", tiny_next, "-n", 3, "--json")
    assert result.code == Exit.USAGE  # the first line that failed
    errors = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "still images only" in errors[0]
    first, second = (json.loads(line) for line in result.out.splitlines())
    assert second["turn"] == 2 and "media" not in second  # the conversation went on, about the image alone


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A Video-LLaVA whose context holds one 8-frame video (40 positions) and a question, not two videos."""
    return build_video_llava(tmp_path_factory.mktemp("short"), context=72)


def test_the_context_check_counts_every_video_before_loading(cli, short):
    assert cli("ask", VIDEO, "Why?", "-m", short, "-n", 2, "--json").code == 0
    result = cli("ask", VIDEO, "Why?", "--with", asset("videos/videollava_sample_demo_9.mp4"), "-m", short)
    assert_clean_failure(result, Exit.USAGE, "2 videos", "80 positions", "72")


def test_the_memory_check_counts_every_file(cli, tiny_model):
    """--max-memory between the estimate of one video and of two: one is answered, two are refused (exit 8)."""
    workload = {"max_new_tokens": 2, "medium": "video"}
    found = videoqa.Checkpoint(tiny_model, device="cpu", dtype="float32", workload=workload)
    one = found.estimate(**workload).total
    two = found.estimate(**workload, extra=[("video", None)]).total
    assert two > one
    cap = f"{(one + two) / 2 / 1e6:.3f}MB"
    assert cli("ask", VIDEO, "Why?", "-m", tiny_model, "-n", 2, "--max-memory", cap).code == 0
    refused = cli("ask", VIDEO, "Why?", "--with", VIDEO, "-m", tiny_model, "-n", 2, "--max-memory", cap)
    assert_clean_failure(refused, Exit.MEMORY, "needs", "--max-memory")


def test_an_add_that_leaves_no_room_is_refused_and_the_conversation_goes_on(chat, short):
    other = asset("videos/videollava_sample_demo_9.mp4")
    result = chat(["Why?", f"/add {other}", "And?"], VIDEO, "-m", short, "-n", 1, "--json")
    assert result.code == Exit.USAGE, result
    errors = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "context holds 72" in errors[0] and "videollava_sample_demo_9.mp4" in errors[0]
    first, second = (json.loads(line) for line in result.out.splitlines())
    assert second["turn"] == 2 and "media" not in second and second["prompt"] == "USER: And? ASSISTANT:"
