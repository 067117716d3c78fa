"""Qwen3-VL on a tiny random checkpoint with the real geometry (tests/qwen_fixtures.py): greedy answers equal
transformers' `generate` on the same weights, pixels and prompt ids (the chat template rendered, then the video's pad
expanded by `Qwen3VLProcessor.replace_video_token` itself, timestamps and all, or an image's pad repeated), for a
video sampled by time and by count, a time window, an image, a two-turn chat and a left-padded caption batch; the
features equal `get_video_features`; the DeepStack rows change the answer; the timestamp text is pinned."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import videoqa
from conftest import asset, needs_assets, reference_logprob
from qwen_fixtures import build_qwen3_vl, chat_text, expanded_ids
from test_qwen2_5_vl import generated
from videoqa.families import qwen3_vl
from videoqa.features import Visual
from videoqa.pixels import qwen_video_pixels

pytestmark = needs_assets
VIDEOS = [asset("videos/videollava_sample_demo_1.mp4"), asset("videos/videollava_sample_demo_3.mp4")]
IMAGE = asset("images/videollava_waterview.jpg")
QUESTION = "Why is this video funny?"


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory):
    return build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"))


@pytest.fixture(scope="session")
def loaded(qwen3):
    return videoqa.load(qwen3, device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="session")
def reference(qwen3):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(qwen3).eval()


def video_inputs(model, media) -> dict:
    """The video's pixels and grid as `generate` takes them (ours: tests/test_qwen_pixels.py holds them to
    `Qwen3VLVideoProcessor`)."""
    pixels, grid = qwen_video_pixels(media.frames.pixels, **qwen3_vl.video_bounds(model.net.config), clip_budget=True)
    return {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid])}


def processor(directory):
    """transformers' Qwen3VLProcessor for `replace_video_token`, its __init__ skipped (it looks the video processor
    class up, which needs torchvision): the video processor from the checkpoint's file, the processor's tokens."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    found = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    settings = json.loads((directory / "video_preprocessor_config.json").read_text())
    found.video_processor = Qwen3VLVideoProcessor(**settings)
    found.vision_start_token, found.vision_end_token, found.video_token = (
        "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
    return found


def video_ids(directory, text: str, media, grid) -> list[int]:
    """The processor's way: the video's pad replaced by `replace_video_token` on the sampled frames' indices in the
    file and its frame rate as transformers' PyAV reader gives them (`average_rate`), then the whole text tokenised."""
    import av
    from transformers import AutoTokenizer
    from transformers.video_utils import VideoMetadata

    with av.open(str(media.path)) as container:
        stream = container.streams.video[0]
        metadata = VideoMetadata(total_num_frames=stream.frames, fps=float(stream.average_rate),
                                 frames_indices=list(media.frames.indices))
    expansion = processor(directory).replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
    return AutoTokenizer.from_pretrained(directory)(text.replace("<|video_pad|>", expansion, 1)).input_ids


def reference_rows(directory, model, medias, questions) -> tuple[list[list[int]], dict]:
    """Each video's prompt ids and the batch's `generate` inputs."""
    inputs = [video_inputs(model, media) for media in medias]
    rows = [video_ids(directory, chat_text(directory, [(q, None)]), media, i["video_grid_thw"])
            for q, media, i in zip(questions, medias, inputs)]
    return rows, {key: torch.cat([i[key] for i in inputs]) for key in inputs[0]}


@pytest.mark.parametrize("framing", [{"fps": 1}, {"frames": 4}, {"frames": 4, "start": 2.5, "end": 6}])
def test_ask_a_video_equals_generate(qwen3, loaded, reference, framing):
    window = {k: framing.pop(k) for k in ("start", "end") if k in framing}
    media = loaded.media(VIDEOS[0], **framing, **window)
    answer = loaded.ask(media, QUESTION, max_new_tokens=10)
    rows, inputs = reference_rows(qwen3, loaded, [media], [QUESTION])
    assert answer.tokens == generated(reference, rows, 10, **inputs)[0]
    assert answer.timings["prefill_tokens"] == len(rows[0])
    assert len({*answer.tokens}) > 1  # not one token repeated: the comparison has teeth


def test_multiple_choice_scores_equal_the_model_forward(qwen3, loaded, reference):
    """DeepStack's visual rows go with the prompt's prefill; the options' tokens come after, as in the forward."""
    options = ["tennis", "golf", "a soccer ball game on grass"]
    media = loaded.media(VIDEOS[0], frames=4)
    answer = loaded.ask(media, QUESTION, choices=options)
    rows, inputs = reference_rows(qwen3, loaded, [media], [QUESTION])
    video = reference.config.video_token_id
    for scored in answer.choices:
        types = torch.tensor([[2 if t == video else 0 for t in rows[0]] + [0] * len(scored["tokens"])])
        expected = reference_logprob(reference, rows[0], scored["tokens"], mm_token_type_ids=types, **inputs)
        assert abs(scored["logprob"] - expected) < 1e-4, (scored, expected)
    assert len({len(c["tokens"]) for c in answer.choices}) > 1


def test_an_image_equals_generate(qwen3, loaded, reference):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(**json.loads((qwen3 / "preprocessor_config.json").read_text()))
    pixels = image_processor(Image.open(IMAGE).convert("RGB"), return_tensors="pt")
    answer = loaded.ask(IMAGE, "What is shown in this image?", max_new_tokens=10)
    ids = expanded_ids(qwen3, chat_text(qwen3, [("What is shown in this image?", None)], "image"),
                       pixels.image_grid_thw[0], "image")
    assert answer.tokens == generated(reference, [ids], 10, pixel_values=pixels.pixel_values,
                                      image_grid_thw=pixels.image_grid_thw)[0]


def test_a_two_turn_chat_equals_generate_on_the_whole_conversation(qwen3, loaded, reference):
    media = loaded.media(VIDEOS[0], frames=4)
    chat = loaded.chat(media)
    first = chat.ask(QUESTION, max_new_tokens=6)
    second = chat.ask("What happens next?", max_new_tokens=6)
    (ids,), inputs = reference_rows(qwen3, loaded, [media], [QUESTION])
    assert first.tokens == generated(reference, [ids], 6, **inputs)[0]
    # turn 2: turn 1's ids, its answer, then what the template writes after an answer and the next question
    both = chat_text(qwen3, [(QUESTION, "ANSWER"), ("What happens next?", None)])
    after = both[both.index("ANSWER") + len("ANSWER"):].removeprefix("<|im_end|>")
    tokenizer = loaded.tokenizer
    eos = [] if first.tokens[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    rows = ids + first.tokens + eos + tokenizer(after, add_special_tokens=False).input_ids
    assert second.tokens == generated(reference, [rows], 6, **inputs)[0]


def test_a_caption_batch_of_prompts_of_different_lengths_equals_generate(qwen3, loaded, reference):
    questions = [QUESTION, "What is happening in the video, and why is it funny?"]
    records = list(loaded.caption(VIDEOS, questions, frames=4, max_new_tokens=8, batch_size=2))
    rows, inputs = reference_rows(qwen3, loaded, [loaded.media(video, frames=4) for video in VIDEOS], questions)
    assert len(rows[0]) != len(rows[1])  # the shorter row is left-padded
    expected = generated(reference, rows, 8, **inputs)
    assert [r["tokens"] for r in records] == expected
    assert expected[0] != expected[1]  # the answers follow the videos


def test_features_and_deepstack_rows_equal_get_video_features(loaded, reference):
    media = loaded.media(VIDEOS[1], frames=4)
    inputs = video_inputs(loaded, media)
    with torch.inference_mode():
        theirs = reference.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert torch.equal(loaded.features(media), theirs.pooler_output[0])  # bit for bit, from the same pixels
    grid = inputs["video_grid_thw"][0].tolist()
    ours = loaded.family.video.features(loaded.net, (inputs["pixel_values_videos"], grid))
    assert len(ours.layers) == 2
    for layer, expected in zip(ours.layers, theirs.deepstack_features):
        assert torch.equal(layer, expected[0])


@pytest.fixture
def without_deepstack():
    """Qwen3-VL registered with its DeepStack rows zeroed (the positions' extras), the real family put back after."""
    def positions(net, ids, padding, past, visuals):
        found = qwen3_vl.positions(net, ids, padding, past, visuals)
        extras = found.extras and {**found.extras, "deepstack_visual_embeds": [
            torch.zeros_like(rows) for rows in found.extras["deepstack_visual_embeds"]]}
        return found._replace(extras=extras)

    videoqa.register(dataclasses.replace(qwen3_vl.FAMILY, positions=positions))
    yield
    videoqa.register(qwen3_vl.FAMILY)


def test_the_deepstack_rows_change_the_answer(qwen3, loaded, without_deepstack):
    media = loaded.media(VIDEOS[0], frames=4)
    zeroed = videoqa.load(qwen3, device="cpu", dtype="float32", cache=False)  # loaded under the copy
    assert zeroed.ask(media, QUESTION, max_new_tokens=10).tokens != loaded.ask(media, QUESTION, max_new_tokens=10).tokens


def test_the_timestamp_text_is_transformers_5_24s():
    """`<{t:.1f} seconds>` of the mean of each patch's first and last frame, an odd count padded by the last frame;
    Python's rounding of the binary value (0.25 and 1.25 are exact: half to even)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    indices, fps = [0, 2, 4, 6, 13, 14, 38], 4.0  # at 0, 0.5, 1, 1.5, 3.25, 3.5 and 9.5 s
    expected = "<0.2 seconds><1.2 seconds><3.4 seconds><9.5 seconds>"
    theirs = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2)
    assert "".join(f"<{t:.1f} seconds>" for t in theirs) == expected
    times = tuple(i / fps for i in indices)
    assert "".join(map(qwen3_vl.timestamp, qwen3_vl.patch_times(times, 2))) == expected


def test_a_video_expands_to_timestamped_patches(qwen3):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3)
    visual = Visual(torch.zeros(2 * 3, 64), torch.tensor([[2, 4, 6]]), times=(0.0, 1.0, 2.0))
    text = tokenizer.decode(qwen3_vl.expand(tokenizer, "<|video_pad|>", visual))
    patch = "<|vision_start|>" + "<|video_pad|>" * 3 + "<|vision_end|>"
    assert text == f"<0.5 seconds>{patch}<2.0 seconds>{patch}"


def test_positions_count_timestamps_and_the_frames_tokens(loaded):
    """Known from the config before reading: per temporal patch its timestamp (at most 9 tokens under the hub
    tokenizer; the fixture's small BPE spells " seconds" in more), vision start, 3 x 5 merged tokens of a 640 x 360
    pair of frames at the fixture's bounds, vision end."""
    config = loaded.net.config
    assert loaded.family.video.positions(config, 4, (360, 640)) == 2 * (9 + 1 + 15 + 1)
    # 5 frames: 3 patches (the last frame repeated), each frame smaller as the clip's bound is shared: 2 x 4 tokens
    assert loaded.family.video.positions(config, 5, (360, 640)) == 3 * (9 + 1 + 8 + 1)


def test_logprobs_hidden_states_and_attentions_equal_generate(qwen3, loaded, reference):
    """Each token's log-probability and top 3, the hidden states (embeddings first) and the attention weights of
    the position that chose it equal `generate`'s (output_scores, hidden_states, attentions; eager attention),
    DeepStack's rows and the timestamps in the prompt."""
    from qwen_fixtures import check_qwen_traced

    media = loaded.media(VIDEOS[0], frames=4)  # 2 temporal patches
    answer = loaded.ask(media, QUESTION, max_new_tokens=4, logprobs=3, hidden_states=True, attentions=True)
    (ids,), inputs = reference_rows(qwen3, loaded, [media], [QUESTION])
    check_qwen_traced(answer, reference, ids, inputs)


def test_explain_shares_sum_to_the_video_share(qwen3, loaded):
    """`explain`: the frames' shares add up to the video's share of the attention; the two frames of a temporal
    patch count its positions half each, so they get the same share; other frames, other shares."""
    from qwen_fixtures import check_patch_shares

    media = loaded.media(VIDEOS[0], frames=4)
    answer = loaded.ask(media, QUESTION, max_new_tokens=4, attentions=True, explain=True)
    (ids,), _ = reference_rows(qwen3, loaded, [media], [QUESTION])
    check_patch_shares(loaded, answer, ids, loaded.media(VIDEOS[0], frames=4, start=2.5, end=6), QUESTION)


def mixed_ids(directory, text: str, media=None, videos=None, images=None) -> list[int]:
    """The processor's way with several files: an image's pad repeated once per merged token, the video's expanded
    by `replace_video_token` (timestamped patches, `video_ids`), then the whole text tokenised."""
    from transformers import AutoTokenizer

    from qwen_fixtures import repeat_pad

    if images is not None:
        text = repeat_pad(text, images["image_grid_thw"][0], "image")
    if videos is not None:
        return video_ids(directory, text, media, videos["video_grid_thw"])
    return AutoTokenizer.from_pretrained(directory)(text).input_ids


def test_ask_a_video_with_an_image_equals_generate_with_both_pixel_inputs(qwen3, loaded, reference):
    """As Qwen2.5-VL's, with the video's timestamped patches, and DeepStack's rows of both files added in the first
    decoder layers."""
    from qwen_fixtures import check_video_with_image

    assert len(reference.config.vision_config.deepstack_visual_indexes) == 2
    check_video_with_image(qwen3, loaded, reference, VIDEOS[0], IMAGE, inputs_of=video_inputs, generate=generated,
                           ids_of=lambda *args: mixed_ids(qwen3, *args))


def test_an_image_then_a_video_added_equals_generate_on_the_whole_conversation(qwen3, loaded, reference):
    from qwen_fixtures import check_image_then_video

    check_image_then_video(qwen3, loaded, reference, VIDEOS[0], IMAGE, inputs_of=video_inputs, generate=generated,
                           ids_of=lambda *args: mixed_ids(qwen3, *args))


def test_conversations_answered_together_go_on_as_each_alone(loaded):
    """`session.together` (the server's batches): a video, an image and another video answered in one left-padded
    batch (M-RoPE per row, DeepStack rows per row) give each one's tokens alone, and each conversation's follow-up
    on its own row of the batch's cache has the tokens and the prefill of one answered alone throughout."""
    from videoqa.session import together

    media, questions = [VIDEOS[0], IMAGE, VIDEOS[1]], ["Why is this funny?", "What is it?", "Describe it in detail."]
    alone = []
    for file, question in zip(media, questions):
        chat = loaded.chat(file, frames=4)
        alone.append((chat.ask(question, max_new_tokens=6), chat.ask("And then?", max_new_tokens=5)))
    chats = [loaded.chat(file, frames=4) for file in media]
    rows: dict[int, list[int]] = {}
    for row, token in together(chats, questions, [{"max_new_tokens": 6}] * 3):
        rows.setdefault(row, []).append(token)
    for row, (chat, (first, second)) in enumerate(zip(chats, alone)):
        assert rows[row] == first.tokens == chat.answers[0].tokens
        follow_up = chat.ask("And then?", max_new_tokens=5)
        assert follow_up.tokens == second.tokens
        assert follow_up.timings["prefill_tokens"] == second.timings["prefill_tokens"]
