"""LLaVA-OneVision (videos and images, Qwen2 ChatML, no BOS) and LLaVA-1.5 (images only) through videoqa's commands
and Python API, against transformers on tiny random checkpoints of the real geometry: greedy tokens of `ask`, a
two-turn `chat` and `caption --batch-size 4` equal `generate` on the same weights, pixels (transformers' own PIL
processors) and prompt ids (built as transformers' processors build them); the feature cache skips the tower;
`model.features` equals `get_video_features`."""

import io
import json
import sys

import pytest
import torch
from PIL import Image

import videoqa
from conftest import assert_clean_failure, asset, needs_assets, reference_continue, reference_net
from onevision_fixtures import (
    build_llava_15,
    build_llava_onevision,
    onevision_processor,
    onevision_video_tokens,
    reference_llava_15_prompt,
    reference_onevision_prompt,
    siglip_reference_pixels,
)
from videoqa.errors import Exit
from videoqa.frames import read_frames
from videoqa.pixels import siglip_pixels

pytestmark = needs_assets  # the real videos and pictures; LLaVA-1.5's Llama-2 tokenizer
VIDEOS = [asset(f"videos/{name}") for name in ("videollava_sample_demo_1.mp4", "videollava_sample_demo_3.mp4",
                                                 "videollava_sample_demo_9.mp4", "videollava_sample_demo_22.mp4")]
QUESTION = "Why is this video funny?"


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return build_llava_onevision(tmp_path_factory.mktemp("onevision"))


@pytest.fixture(scope="module")
def llava_15(tmp_path_factory):
    return build_llava_15(tmp_path_factory.mktemp("llava15"))


@pytest.fixture(scope="module")
def reference(onevision):
    """transformers' own LlavaOnevisionForConditionalGeneration and tokenizer, loaded from the same directory."""
    return reference_net(onevision)


def video_answer(reference, video, question: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, transformers' greedy answer) for 8 frames of `video`: SigLIP pixels from transformers' processor,
    the chat template's prompt with the processor's placeholder count, `generate`."""
    net, tokenizer = reference
    frames = read_frames(video, 8)
    ids = reference_onevision_prompt(tokenizer, question, "<video>", onevision_video_tokens(net, 8))
    pixels = siglip_reference_pixels(net, list(frames.pixels))[None]  # (1, 8, 3, 384, 384)
    return ids, reference_continue(net, ids, max_new_tokens, pixel_values_videos=pixels)


def ask(cli, media, question: str, model, *extra) -> dict:
    result = cli("ask", media, question, "-m", model, "--json", *extra)
    assert result.code == 0, result
    return json.loads(result.out)


def test_video_answer_equals_generate(cli, onevision, reference):
    record = ask(cli, VIDEOS[0], QUESTION, onevision, "-n", 12)
    ids, expected = video_answer(reference, VIDEOS[0], QUESTION, 12)
    assert record["tokens"] == expected
    assert record["prompt"] == f"<|im_start|>user <video>\n{QUESTION}<|im_end|><|im_start|>assistant\n"
    # 8 frames x 14 x 14 pooled positions + one newline, and no BOS before the prompt
    assert record["timings"]["prefill_tokens"] == len(ids) and ids.count(reference[0].config.video_token_id) == 1569


@pytest.fixture(scope="module")
def large_picture(tmp_path_factory):
    """A real 2048x1810 picture (a frame of a screen recording): a 6 x 5 tile grid that anyres_max_9 shrinks."""
    path = tmp_path_factory.mktemp("images") / "large.png"
    Image.fromarray(read_frames(asset("videos/videollava_assets_demo.mp4"), 1).pixels[0]).save(path)
    return path


def test_image_answers_equal_generate(cli, onevision, reference, large_picture):
    net, tokenizer = reference
    question = "What is shown in this image?"
    processor = onevision_processor(tokenizer, net.config.image_grid_pinpoints)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    answers = []
    for path in (asset("images/videollava_waterview.jpg"), asset("images/videollava_sample_img_22.png"),
                 large_picture):  # landscape 1000x667, square 225x225, large: shrunk to about 9 tiles' worth
        record = ask(cli, path, question, onevision, "-n", 8)
        inputs = processor(text=text, images=Image.open(path).convert("RGB"), return_tensors="pt")
        ids = inputs.input_ids[0].tolist()
        expected = reference_continue(net, ids, 8, pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)
        assert record["tokens"] == expected, path
        assert record["timings"]["prefill_tokens"] == len(ids) and record["frames"] == []
        answers.append(tuple(expected))
    assert len(set(answers)) > 1  # the answers depend on the picture


def test_two_turn_chat_equals_generate(cli, onevision, reference, monkeypatch):
    net, tokenizer = reference
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\nWhat happens next?\n"))
    result = cli("chat", VIDEOS[0], "-m", onevision, "-n", 8, "--json")
    assert result.code == 0, result
    first, second = (json.loads(line) for line in result.out.splitlines())
    ids, expected = video_answer(reference, VIDEOS[0], QUESTION, 8)
    assert first["tokens"] == expected
    # The chat template's later user turn follows the answer and its <|im_end|> (added when the answer was cut off)
    followup = "<|im_start|>user \nWhat happens next?<|im_end|><|im_start|>assistant\n"
    eos = [] if expected[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    conversation = ids + expected + eos + tokenizer(followup, add_special_tokens=False).input_ids
    pixels = siglip_reference_pixels(net, list(read_frames(VIDEOS[0], 8).pixels))[None]
    assert second["tokens"] == reference_continue(net, conversation, 8, pixel_values_videos=pixels)
    assert second["prompt"] == followup and second["turn"] == 2
    # Only the new turn is prefilled, and the answer's last token, which decoding never fed back
    assert second["timings"]["prefill_tokens"] == len(conversation) - (len(ids) + len(expected) - 1)


def test_caption_batches_of_4_equal_generate(cli, onevision, reference):
    result = cli("caption", *VIDEOS, "-m", onevision, "-n", 8, "-b", 4, "--prompt", QUESTION)
    assert result.code == 0, result
    records = [json.loads(line) for line in result.out.splitlines()]
    expected = [video_answer(reference, video, QUESTION, 8)[1] for video in VIDEOS]
    assert [r["tokens"] for r in records] == expected
    assert len({tuple(answer) for answer in expected}) > 1  # the answers depend on the video


def test_one_prompt_per_video_left_pads_with_qwen2s_pad(onevision, reference):
    """Prompts of different lengths in one batch: the shorter rows are left-padded with <|endoftext|>."""
    model = videoqa.load(onevision, device="cpu", dtype="float32", cache=False)
    prompts = ["Why?", "What is the person in this video doing, and where?", "Describe the video in detail.", "Why?"]
    batched = [r["tokens"] for r in model.caption(VIDEOS, prompts, batch_size=4, max_new_tokens=8)]
    assert batched == [video_answer(reference, v, p, 8)[1] for v, p in zip(VIDEOS, prompts)]


def test_the_feature_cache_skips_the_tower(cli, onevision, counted):
    first = ask(cli, VIDEOS[0], QUESTION, onevision, "-n", 8)
    assert counted["frames"] == 1 and counted["towers"] == [8]
    model = videoqa.load(onevision, device="cpu", dtype="float32")  # a new session, through the API
    assert model.ask(VIDEOS[0], QUESTION, max_new_tokens=8).tokens == first["tokens"]
    assert counted["frames"] == 1 and counted["towers"] == [8]  # nothing decoded, no tower run


def assert_vision_modules_exist(model) -> None:
    """The family's vision modules (kept unquantized) name real modules or parameters of the loaded class."""
    for path in model.family.vision_modules:
        module, _, name = path.rpartition(".")
        assert hasattr(model.net.get_submodule(module), name), path


def test_features_equal_get_video_features_and_the_newline(onevision, reference):
    """Bit for bit, from the same pixels: ours (test_onevision_pixels holds them to transformers' processor)."""
    net, _ = reference
    model = videoqa.load(onevision, device="cpu", dtype="float32", cache=False)
    features = model.features(VIDEOS[0])
    pixels = torch.from_numpy(siglip_pixels(read_frames(VIDEOS[0], 8).pixels, 384))[None]
    with torch.inference_mode():
        expected = net.model.get_video_features(pixel_values_videos=pixels).pooler_output[0]
    assert expected.shape == (8 * 196 + 1, 64) and torch.equal(expected[-1], net.model.image_newline.detach())
    assert torch.equal(features, expected)
    assert model.family.video.positions(net.config, 8) == len(features)  # known from the config alone
    assert_vision_modules_exist(model)


def test_frames_up_to_the_context(cli, onevision, counted):
    """196 positions per frame and one per video: 167 frames fit the 32,768-token context, 168 are refused before a
    frame is decoded."""
    result = cli("ask", VIDEOS[0], QUESTION, "-m", onevision, "--frames", 168)
    assert_clean_failure(result, Exit.USAGE, "32929 positions", "32768", "at most 167 frames")
    assert counted["frames"] == 0


def test_llava_15_image_answers_equal_generate(cli, llava_15):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    net, tokenizer = reference_net(llava_15)
    question = "What is shown in this image?"
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    answers = []
    for name in ("videollava_desert.jpg", "videollava_extreme_ironing.jpg"):
        path = asset(f"images/{name}")
        record = ask(cli, path, question, llava_15, "-n", 8)
        ids = reference_llava_15_prompt(tokenizer, question)
        pixels = processor([Image.open(path).convert("RGB")], return_tensors="pt").pixel_values
        assert record["tokens"] == reference_continue(net, ids, 8, pixel_values=pixels), name
        assert record["prompt"] == f"USER: <image>\n{question} ASSISTANT:"
        assert record["timings"]["prefill_tokens"] == len(ids)  # BOS + 576 image positions + the text
        answers.append(tuple(record["tokens"]))
    assert answers[0] != answers[1]
    assert_vision_modules_exist(videoqa.load(llava_15, device="cpu", dtype="float32"))


def test_llava_15_refuses_a_video_before_loading(cli, llava_15, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", refuse)
    assert_clean_failure(cli("ask", VIDEOS[0], QUESTION, "-m", llava_15), Exit.USAGE, "llava", "images only")
    assert_clean_failure(cli("caption", VIDEOS[0], "-m", llava_15), Exit.USAGE, "images only")


def test_presets():
    from videoqa.models import presets

    found = presets()
    assert {name: (found[name].repo, found[name].family.name) for name in
            ("llava-onevision-0.5b", "llava-onevision-7b", "llava-1.5-7b")} == {
        "llava-onevision-0.5b": ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision"),
        "llava-onevision-7b": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision"),
        "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", "llava"),
    }
    assert found["llava-onevision-0.5b"].template.startswith("<|im_start|>user {media}\n")
    assert found["llava-1.5-7b"].template == "USER: {media}\n{question} ASSISTANT:"
    assert found["llava-1.5-7b"].followup == "USER: {question} ASSISTANT:"


# Mixed media: one question, or one conversation, about an image and a video at once
PHOTO = asset("images/videollava_waterview.jpg")
CATS, FUNNY = "How many cats are there in the image?", "Why is this video funny?"


@pytest.fixture(scope="module")
def loaded(onevision):
    return videoqa.load(onevision, device="cpu", dtype="float32", cache=False)


def mixed_ids(reference, content: list[str], question: str, frames: int) -> tuple[list[int], dict]:
    """One user turn about `content` ("image"s and "video"s, in the order given) rendered by the checkpoint's chat
    template (images first) with the generation prompt; the image's placeholder expanded by LlavaOnevisionProcessor
    (with its pixel_values and image_sizes), the video's the processor's way (`frames` frames): (ids, image inputs)."""
    net, tokenizer = reference
    processor = onevision_processor(tokenizer, net.config.image_grid_pinpoints)
    turn = [{"role": "user", "content": [*({"type": kind} for kind in content), {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    text, images = text.replace("<video>", "<video>" * onevision_video_tokens(net, frames)), {}
    if "image" in content:  # the processor refuses <video> without videos (it has no video processor here), so it
        inputs = processor(text="<image>", images=Image.open(PHOTO).convert("RGB"), return_tensors="pt")
        assert set(inputs.input_ids[0].tolist()) == {net.config.image_token_id}
        text = text.replace("<image>", "<image>" * len(inputs.input_ids[0]))  # expands the image on its own
        images = {"pixel_values": inputs.pixel_values, "image_sizes": inputs.image_sizes}
    return tokenizer(text, add_special_tokens=False).input_ids, images


def test_ask_about_a_video_and_an_image_equals_generate_with_both_pixel_inputs(loaded, reference):
    """`videoqa ask clip.mp4 Q --with photo.jpg`: the template renders the image first, then the video."""
    net, tokenizer = reference
    video = loaded.media(VIDEOS[0], frames=4)
    question = "Is the person in the photo in the video?"
    answer = loaded.ask([video, PHOTO], question, max_new_tokens=8)
    ids, images = mixed_ids(reference, ["video", "image"], question, 4)
    assert ids.count(net.config.video_token_id) == 4 * 196 + 1 and ids.count(net.config.image_token_id) > 729
    assert ids.index(net.config.image_token_id) < ids.index(net.config.video_token_id)  # images first
    videos = {"pixel_values_videos": siglip_reference_pixels(net, list(video.frames.pixels))[None]}
    expected = reference_continue(net, ids, 8, **images, **videos)
    assert answer.tokens == expected and len(set(expected)) > 1  # not one token repeated: the check has teeth
    assert answer.prompt == f"<|im_start|>user <image><video>\n{question}<|im_end|><|im_start|>assistant\n"
    assert answer.timings["prefill_tokens"] == len(ids)
    # both files matter: without the image (or the video) transformers answers otherwise
    alone, _ = mixed_ids(reference, ["video"], question, 4)
    assert reference_continue(net, alone, 8, **videos) != expected


def test_an_image_then_a_video_in_one_conversation_equals_generate(loaded, reference):
    """`chat photo.jpg`, a question, `/add clip.mp4`, a question: the second turn brings the video, after the
    first answer's <|im_end|>; transformers gets the whole conversation's ids with both pixel inputs."""
    net, tokenizer = reference
    chat = loaded.chat(PHOTO)
    first = chat.ask(CATS, max_new_tokens=6)
    video = loaded.media(VIDEOS[0], frames=4)
    chat.add(video)
    second = chat.ask(FUNNY, max_new_tokens=6)

    prompt, images = mixed_ids(reference, ["image"], CATS, 4)
    assert first.tokens == reference_continue(net, prompt, 6, **images)
    eos = [] if first.tokens[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    later, _ = mixed_ids(reference, ["video"], FUNNY, 4)  # the template's user turn about the video
    assert second.prompt == f"<|im_start|>user <video>\n{FUNNY}<|im_end|><|im_start|>assistant\n"
    whole = [*prompt, *first.tokens, *eos, *later]
    videos = {"pixel_values_videos": siglip_reference_pixels(net, list(video.frames.pixels))[None]}
    expected = reference_continue(net, whole, 6, **images, **videos)
    assert second.tokens == expected and len(set(expected)) > 1
    # the cache held turn 1 (all but its last answer token, never fed back): turn 2 prefilled only what follows
    assert second.timings["prefill_tokens"] == len(whole) - (len(prompt) + len(first.tokens) - 1)
