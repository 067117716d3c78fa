"""SmolVLM2 through videoqa's Python API against transformers on a tiny random checkpoint of the real geometry
(tests/smolvlm_fixtures.py): greedy tokens of `ask` (by fps, by a frame count, in a time window, on pictures), a
two-turn `chat` and a `caption` batch of prompts of two lengths equal `generate` on the same weights, with the
pixels and prompt ids of transformers' own SmolVLMProcessor given the frames videoqa sampled (their indices and the
video's frame rate: the metadata a decoder gives it, less the duration, which videoqa's features do not carry);
`model.features` equals `get_image_features`."""

import av
import pytest
import torch
from PIL import Image

import videoqa
from conftest import asset, assert_clean_failure, needs_assets, reference_continue, reference_logprob, reference_net
from conftest import reference_torchao
from smolvlm_fixtures import build_smolvlm, smolvlm_processor
from videoqa.errors import Exit
from videoqa.families import smolvlm
from videoqa.features import Visual

pytestmark = needs_assets
VIDEOS = [asset("videos/videollava_sample_demo_1.mp4"), asset("videos/videollava_sample_demo_3.mp4")]
QUESTION = "Why is this video funny?"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return build_smolvlm(tmp_path_factory.mktemp("smolvlm"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return videoqa.load(checkpoint, device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' own SmolVLMForConditionalGeneration (by AutoModelForImageTextToText) and tokenizer."""
    return reference_net(checkpoint)


def user_turn(medium: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": medium}, {"type": "text", "text": question}]}]


def processed_video(checkpoint, path, frames, question: str):
    """SmolVLMProcessor's input_ids and pixel_values for `frames` (videoqa's Frames) of the video at `path`: the
    chat template it swaps in for videos, its expansion from the frames' indices and the video's frame rate."""
    from transformers.video_utils import VideoMetadata

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        metadata = VideoMetadata(total_num_frames=stream.frames, fps=float(stream.average_rate),
                                 frames_indices=frames.indices)
    with smolvlm_processor(checkpoint) as processor:
        text = processor.apply_chat_template(user_turn("video", question), add_generation_prompt=True)
        return processor(text=text, videos=[frames.pixels], video_metadata=[metadata], return_tensors="pt",
                         add_special_tokens=False)  # as apply_chat_template tokenises a text that starts with BOS


def video_answer(checkpoint, reference, model, path, question: str, max_new_tokens: int = 8, **framing):
    """(prompt ids, transformers' greedy answer) for the frames videoqa samples from `path` with `framing`."""
    inputs = processed_video(checkpoint, path, model.media(path, **framing).frames, question)
    ids = inputs.input_ids[0].tolist()
    return ids, reference_continue(reference[0], ids, max_new_tokens, pixel_values=inputs.pixel_values)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """The vocabulary padded to a multiple of 16, as int4's packing needs (the real one's 49,280 is)."""
    return build_smolvlm(tmp_path_factory.mktemp("smolvlm_padded"), vocab_multiple=16)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_torchao_quantization_equals_generate_under_the_same_config(padded, quantize):
    """SmolVLM2's 96-wide test model: int4 in groups of 32 (the largest that divides its widths)."""
    quantized = videoqa.load(padded, device="cpu", dtype="float32", quantize=quantize, cache=False)
    net = reference_torchao(padded, quantize, ["model.vision_model", "model.connector"], 32, torch.float32)
    ids, _ = video_answer(padded, reference_net(padded), quantized, VIDEOS[0], QUESTION, 1, frames=3)
    inputs = processed_video(padded, VIDEOS[0], quantized.media(VIDEOS[0], frames=3).frames, QUESTION)
    expected = reference_continue(net, ids, 16, pixel_values=inputs.pixel_values)
    assert quantized.ask(VIDEOS[0], QUESTION, frames=3, max_new_tokens=16).tokens == expected and len(set(expected)) > 1


def test_multiple_choice_scores_equal_the_model_forward(checkpoint, reference, model):
    options = ["tennis", "golf", "a soccer ball game on grass"]
    answer = model.ask(VIDEOS[0], QUESTION, choices=options, frames=3)
    inputs = processed_video(checkpoint, VIDEOS[0], model.media(VIDEOS[0], frames=3).frames, QUESTION)
    ids = inputs.input_ids[0].tolist()
    for scored in answer.choices:
        expected = reference_logprob(reference[0], ids, scored["tokens"], pixel_values=inputs.pixel_values)
        assert abs(scored["logprob"] - expected) < 1e-4, (scored, expected)
    assert len({len(c["tokens"]) for c in answer.choices}) > 1


def test_int4_refuses_a_vocabulary_its_packing_cannot_take(checkpoint, cli):
    result = cli("ask", VIDEOS[0], QUESTION, "-m", checkpoint, "--quantize", "int4")
    assert_clean_failure(result, Exit.MODEL, "--quantize int4", "multiples of 16", "--quantize int8")


def test_frame_counts_in_words_are_num2words():
    from num2words import num2words

    for number in [*range(2100), 9999, 10_001, 12_345, 100_000, 123_456, 999_999]:
        assert smolvlm.words(number) == num2words(number), number


@pytest.mark.parametrize("framing, count", [({"fps": 1}, 9), ({"frames": 4}, 4), ({"start": 2.5, "end": 7}, 4)],
                         ids=["fps 1", "4 frames", "window 2.5-7 s"])
def test_video_answers_equal_generate(checkpoint, reference, model, framing, count):
    answer = model.ask(VIDEOS[0], QUESTION, max_new_tokens=8, **framing)
    ids, expected = video_answer(checkpoint, reference, model, VIDEOS[0], QUESTION, **framing)
    assert answer.tokens == expected
    assert answer.timings["prefill_tokens"] == len(ids)
    assert answer.prompt == f"User:<image>{QUESTION}<end_of_utterance>\nAssistant:"
    assert len(answer.frames) == count  # fps 1 by default, as the checkpoint's video_sampling
    assert ids.count(reference[0].config.image_token_id) == count * 4
    text = reference[1](f"<|im_start|>User:{QUESTION}<end_of_utterance>\nAssistant:", add_special_tokens=False)
    media = len(ids) - len(text.input_ids)  # what the video's expansion takes
    assert model.family.video.positions(model.net.config, count) >= media  # known before, from the config


def test_a_question_that_starts_with_a_digit_is_tokenised_with_the_videos_text(checkpoint, reference, model):
    """The video's text ends in a blank line, which merges with what follows it: the prompt is tokenised whole."""
    question = "3 things happen here: which?"
    answer = model.ask(VIDEOS[1], question, max_new_tokens=8, frames=4)
    ids, expected = video_answer(checkpoint, reference, model, VIDEOS[1], question, frames=4)
    assert answer.timings["prefill_tokens"] == len(ids) and answer.tokens == expected


def test_the_video_text_is_the_processors(checkpoint, reference, model):
    """Times in the window are the video's own; the duration is the last frame's second."""
    frames = model.media(VIDEOS[0], start=2.5, end=7).frames
    text = reference[1].decode(processed_video(checkpoint, VIDEOS[0], frames, QUESTION).input_ids[0])
    assert text.startswith("<|im_start|>User: You are provided the following series of four frames from a 0:00:06 "
                           "[H:MM:SS] video.\n\nFrame from 00:02:<fake_token_around_image><global-img><image>")
    assert "<fake_token_around_image>\nFrame from 00:04:" in text and text.count("\nFrame from ") == 4
    assert text.endswith(f"<image><fake_token_around_image>\n\n{QUESTION}<end_of_utterance>\nAssistant:")


def test_image_answers_equal_generate(checkpoint, reference, model):
    net, tokenizer = reference
    question = "What is shown in this image?"
    answers = []
    for name, split in (("videollava_waterview.jpg", (3, 4)), ("videollava_sample_img_22.png", (4, 4))):
        path = asset(f"images/{name}")
        answer = model.ask(path, question, max_new_tokens=8)
        with smolvlm_processor(checkpoint) as processor:
            text = processor.apply_chat_template(user_turn("image", question), add_generation_prompt=True)
            inputs = processor(text=text, images=[Image.open(path)], return_tensors="pt", add_special_tokens=False)
        ids = inputs.input_ids[0].tolist()
        assert text == f"<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"  # the hub's template
        assert answer.tokens == reference_continue(net, ids, 8, pixel_values=inputs.pixel_values), name
        assert answer.timings["prefill_tokens"] == len(ids) and answer.frames == []
        rows, cols = split
        tiles = [t for t in tokenizer.convert_ids_to_tokens(ids) if t.startswith("<row_")]
        assert inputs.pixel_values.shape[1] == rows * cols + 1 and len(tiles) == rows * cols
        assert tiles[-1] == f"<row_{rows}_col_{cols}>"
        answers.append(tuple(answer.tokens))
    assert answers[0] != answers[1]  # the answers depend on the picture
    # the square picture is split the most: the largest image's tiles, and a bound on its positions
    tiles, positions = model.family.largest_image(model.net.config)
    assert tiles == 17 and positions >= ids.count(net.config.image_token_id) + 2 * 16 + 3


def test_an_unsplit_image_is_the_global_image_alone(reference):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    tokenizer = reference[1]
    text = get_image_prompt_string(0, 0, 4, "<fake_token_around_image>", "<image>", "<global-img>")
    visual = Visual(torch.zeros(4, 8), grid=torch.tensor([[1, 0, 0]]))
    assert smolvlm.expand(tokenizer, "<image>", visual) == text  # written in the prompt as the processor writes it


def test_two_turn_chat_equals_generate(checkpoint, reference, model):
    net, tokenizer = reference
    chat = model.chat(VIDEOS[1], frames=4)
    first = chat.ask(QUESTION, max_new_tokens=8)
    second = chat.ask("What happens next?", max_new_tokens=8)
    ids, expected = video_answer(checkpoint, reference, model, VIDEOS[1], QUESTION, frames=4)
    assert first.tokens == expected
    # The later turn as the chat template writes it after the answer and its <end_of_utterance>
    followup = "\nUser: What happens next?<end_of_utterance>\nAssistant:"
    eos = [] if expected[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    conversation = ids + expected + eos + tokenizer(followup, add_special_tokens=False).input_ids
    pixels = processed_video(checkpoint, VIDEOS[1], model.media(VIDEOS[1], frames=4).frames, QUESTION).pixel_values
    assert second.tokens == reference_continue(net, conversation, 8, pixel_values=pixels)
    assert second.prompt == followup
    with smolvlm_processor(checkpoint) as processor:
        turns = [*user_turn("video", "Q1"), {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
                 {"role": "user", "content": [{"type": "text", "text": "Q2"}]}]
        rendered = processor.apply_chat_template(turns, add_generation_prompt=True)
    assert rendered == "<|im_start|>User: <video>Q1<end_of_utterance>\nAssistant: A1<end_of_utterance>" + \
        followup.replace("What happens next?", "Q2")


def test_caption_batch_of_two_prompt_lengths_equals_generate(checkpoint, reference, model):
    prompts = ["Why?", "What is the person in this video doing, and where?"]
    batched = [r["tokens"] for r in model.caption(VIDEOS, prompts, batch_size=2, max_new_tokens=8)]
    expected = [video_answer(checkpoint, reference, model, v, p)[1] for v, p in zip(VIDEOS, prompts)]
    assert batched == expected
    assert expected[0] != expected[1]  # the answers depend on the video


def test_features_equal_get_image_features(checkpoint, reference, model):
    net, _ = reference
    frames = model.media(VIDEOS[0], frames=4).frames
    pixels = processed_video(checkpoint, VIDEOS[0], frames, QUESTION).pixel_values
    with torch.inference_mode():
        expected = net.model.get_image_features(pixel_values=pixels).pooler_output[0]
    features = model.features(VIDEOS[0], frames=4)
    assert expected.shape == (4 * 4, 96) and torch.equal(features, expected)
    path = asset("images/videollava_desert.jpg")
    with smolvlm_processor(checkpoint) as processor:
        pixels = processor.image_processor([Image.open(path)], return_tensors="pt").pixel_values
    with torch.inference_mode():
        expected = net.model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert torch.equal(model.features(path), expected)
    for name in model.family.vision_modules:  # the vision side by its real module paths
        assert isinstance(model.net.get_submodule(name), torch.nn.Module), name
    assert model.family.tower_tokens(net.config, 4) == 64  # SigLIP's 8 x 8 patches a tile, no CLS



def test_find_refuses_a_tokenizer_that_starts_yes_and_no_alike(checkpoint, cli):
    """The fixture's small BPE splits " Yes" and " No" after "Assistant:" into "Ġ" + the word: their first tokens
    are the same, so no next-token score could tell them apart; one line and exit code 4 instead of 0.5 each."""
    result = cli("find", str(VIDEOS[0]), "a baby", "-m", str(checkpoint), "--segments", "1", "--frames", "2",
                 "--device", "cpu", "--dtype", "float32")
    assert result.code == 4 and result.out == ""
    assert result.err.count("\n") == 1 and 'begins both "Yes" and "No"' in result.err


def test_logprobs_hidden_states_and_attentions_equal_generate(checkpoint, reference, model):
    """Each token's log-probability and top 3, the hidden states (embeddings first) and the attention weights of
    the position that chose it equal `generate`'s (output_scores, hidden_states, attentions; eager attention)."""
    from conftest import check_traced, reference_traced

    net = reference[0]
    media = model.media(VIDEOS[0], frames=3)
    answer = model.ask(media, QUESTION, max_new_tokens=4, logprobs=3, hidden_states=True, attentions=True)
    inputs = processed_video(checkpoint, VIDEOS[0], media.frames, QUESTION)
    ids = inputs.input_ids[0].tolist()
    out = reference_traced(net, ids, 4, pixel_values=inputs.pixel_values)
    check_traced(answer, out, len(ids), 3)
    text = net.config.text_config
    assert answer.hidden_states.shape == (4, text.num_hidden_layers + 1, text.hidden_size)
    assert len(set(answer.tokens)) > 1  # not one token repeated: the comparison has teeth


def test_explain_shares_sum_to_the_video_share(checkpoint, reference, model):
    """`explain`: the frames' shares (each frame's <image> rows) add up to the video's share of the attention;
    other frames, other shares."""
    media = model.media(VIDEOS[0], frames=3)
    answer = model.ask(media, QUESTION, max_new_tokens=4, attentions=True, explain=True)
    ids = processed_video(checkpoint, VIDEOS[0], media.frames, QUESTION).input_ids[0].tolist()
    assert answer.timings["prefill_tokens"] == len(ids)
    image = reference[0].config.image_token_id  # the video's frames are written as <image> rows, 4 a frame
    where = [i for i, token in enumerate(ids) if token == image]
    assert len(where) == 3 * 4
    weights = torch.stack([w.mean((0, 1))[: len(ids)] for w in answer.attentions]).mean(0)  # over the tokens
    each = [float(weights[where[4 * f: 4 * f + 4]].sum()) for f in range(3)]  # frame after frame
    frames = [frame["attention"] for frame in answer.frames]
    assert len(frames) == 3
    assert abs(sum(frames) - sum(each)) < 1e-5
    assert max(abs(a - b) for a, b in zip(frames, each)) < 1e-5
    other = model.ask(VIDEOS[1], QUESTION, frames=3, max_new_tokens=4, explain=True)
    assert not torch.allclose(torch.tensor([f["attention"] for f in other.frames]), torch.tensor(frames))


# Mixed media: one question about a video and an image, and an image-then-video conversation (`Chat.add`)
IMAGE = asset("images/videollava_desert.jpg")


def video_metadata(path, frames):
    """What a decoder gives the processor for `frames` (videoqa's Frames) of the video at `path` (as
    processed_video writes it)."""
    from transformers.video_utils import VideoMetadata

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return VideoMetadata(total_num_frames=stream.frames, fps=float(stream.average_rate),
                             frames_indices=frames.indices)


def processed_media(checkpoint, text: str, image=None, video=None) -> tuple[list[int], torch.Tensor]:
    """SmolVLMProcessor's ids for `text` with its <image> and <video> expanded (in one pass, as the processor's
    __call__ does) for the image at `image` and the (path, Frames) `video`, and the model's one pixel_values of
    both: the image's tiles and global image and the video's frames along N in the order the text places them.
    (Given both, the processor's own pixel_values holds the video's alone: its video outputs overwrite its
    image's, so the pixels are the image and video processors' own, concatenated here.)"""
    arguments, pixels = {}, {}
    with smolvlm_processor(checkpoint) as processor:
        if image is not None:
            arguments["images"] = [Image.open(image)]
            pixels["<image>"] = processor.image_processor(arguments["images"], return_tensors="pt")
        if video is not None:
            metadata = video_metadata(*video)
            arguments.update(videos=[video[1].pixels], video_metadata=[metadata])
            pixels["<video>"] = processor.video_processor([video[1].pixels], video_metadata=[metadata],
                                                          return_tensors="pt")
        inputs = processor(text=text, return_tensors="pt", add_special_tokens=False, **arguments)
    for each in pixels.values():  # every tile and frame whole: no pixel_attention_mask to pass
        assert bool(each.pixel_attention_mask.all())
    order = sorted(pixels, key=text.index)
    return inputs.input_ids[0].tolist(), torch.cat([pixels[name].pixel_values for name in order], 1)


def test_a_question_about_a_video_and_an_image_equals_generate_with_both_pixels(checkpoint, reference, model):
    """`ask([video, image], Q)` (`videoqa ask clip.mp4 Q --with photo.jpg`): one user turn [video, image, text],
    as the template transformers swaps in for videos writes it, the video's expansion then the image's."""
    net, tokenizer = reference
    question = "Is the person in the photo in the video?"
    media = model.media(VIDEOS[0], frames=4)
    answer = model.ask([media, IMAGE], question, max_new_tokens=8)
    with smolvlm_processor(checkpoint) as processor:
        turn = [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(turn, add_generation_prompt=True)
    assert text == f"<|im_start|>User: <video><image>{question}<end_of_utterance>\nAssistant:"  # ': ': a video first
    ids, pixels = processed_media(checkpoint, text, image=IMAGE, video=(VIDEOS[0], media.frames))
    tiles = [t for t in tokenizer.convert_ids_to_tokens(ids) if t.startswith("<row_")]
    assert tiles[-1] == "<row_3_col_4>" and pixels.shape[1] == 4 + len(tiles) + 1  # frames, tiles, global image
    assert ids.count(net.config.image_token_id) == pixels.shape[1] * 4
    decoded = tokenizer.decode(ids)
    assert decoded.index("Frame from 00:09:") < decoded.index("<row_1_col_1>")  # the video's expansion first
    expected = reference_continue(net, ids, 8, pixel_values=pixels)
    assert answer.tokens == expected and len(set(expected)) > 1  # not one token repeated: the comparison has teeth
    assert answer.timings["prefill_tokens"] == len(ids)
    assert answer.media == [VIDEOS[0], IMAGE] and len(answer.frames) == 4
    # what the answer depends on: the image, and the order of the rows (the image's tiles first: another answer)
    swapped = torch.cat([pixels[:, 4:], pixels[:, :4]], 1)
    assert reference_continue(net, ids, 8, pixel_values=swapped) != expected
    assert model.ask(media, question, max_new_tokens=8).tokens != expected


def test_an_image_then_a_video_in_one_chat_equals_generate(checkpoint, reference, model):
    """`chat(image)`, a question, `add(video)`, a question: turn 1 is the image's alone; turn 2 places the video
    after the first answer and its <end_of_utterance>, and generate on the whole conversation with the image's
    tiles then the video's frames gives its tokens; the cache kept turn 1, so turn 2 prefilled only what follows."""
    net, tokenizer = reference
    first_question, second_question = "How many cats are there in the image?", QUESTION
    media = model.media(VIDEOS[0], frames=4)
    chat = model.chat(IMAGE)
    first = chat.ask(first_question, max_new_tokens=6)
    chat.add(media)
    second = chat.ask(second_question, max_new_tokens=6)

    with smolvlm_processor(checkpoint) as processor:
        turn = user_turn("image", first_question)
        opening = processor.apply_chat_template(turn, add_generation_prompt=True)
        turns = [*turn, {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
                 *user_turn("video", second_question)]
        rendered = processor.apply_chat_template(turns, add_generation_prompt=True)
    followup = f"\nUser: <video>{second_question}<end_of_utterance>\nAssistant:"
    assert opening == f"<|im_start|>User:<image>{first_question}<end_of_utterance>\nAssistant:"
    assert rendered == opening + " A1<end_of_utterance>" + followup  # the answer is the tokens generated instead

    prompt, tiles = processed_media(checkpoint, opening, image=IMAGE)
    expected = reference_continue(net, prompt, 6, pixel_values=tiles)
    assert first.tokens == expected and first.timings["prefill_tokens"] == len(prompt)
    later, frames = processed_media(checkpoint, followup, video=(VIDEOS[0], media.frames))
    eos = [] if first.tokens[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    whole = prompt + first.tokens + eos + later
    assert tiles.shape[1] == 13 and frames.shape[1] == 4
    expected = reference_continue(net, whole, 6, pixel_values=torch.cat([tiles, frames], 1))
    assert second.tokens == expected and len(set(expected)) > 1  # not one token repeated: the comparison has teeth
    # the cache held turn 1 (all but its last answer token): turn 2 prefilled only what follows
    assert second.timings["prefill_tokens"] == len(whole) - (len(prompt) + len(first.tokens) - 1)
    # the prompt as shown: the placeholder once where the video's text goes (its space is the video text's own)
    assert second.prompt == "\nUser:<image>Why is this video funny?<end_of_utterance>\nAssistant:"
    assert second.media == [IMAGE, VIDEOS[0]] and len(second.frames) == 4 and first.frames == []
