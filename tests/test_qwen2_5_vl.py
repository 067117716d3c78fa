"""Qwen2.5-VL on a tiny random checkpoint with the real geometry (tests/qwen_fixtures.py): greedy answers equal
transformers' `generate` on the same weights, pixels and prompt ids (built the processor's way: the chat template
rendered, the pad repeated once per merged token), for a video sampled by time and by count, a time window, an
image, a two-turn chat and a left-padded caption batch; the features equal `get_video_features`; the hub's file
layout (flat config.json with `rope_scaling`, legacy weight names, sharded safetensors) loads through `-m DIR`."""

from __future__ import annotations

import json

import pytest
import torch

import videoqa
from conftest import asset, needs_assets, reference_logprob, reference_torchao
from qwen_fixtures import build_qwen2_5_vl, chat_text, check_patch_shares, expanded_ids
from videoqa.families.qwen2_5_vl import video_bounds
from videoqa.pixels import qwen_video_pixels

pytestmark = needs_assets
VIDEOS = [asset("videos/videollava_sample_demo_1.mp4"), asset("videos/videollava_sample_demo_3.mp4")]
IMAGE = asset("images/videollava_waterview.jpg")
QUESTION = "Why is this video funny?"


@pytest.fixture(scope="session")
def qwen25(tmp_path_factory):
    return build_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="session")
def loaded(qwen25):
    return videoqa.load(qwen25, device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="session")
def reference(qwen25):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(qwen25).eval()


def video_inputs(model, media) -> dict:
    """The video's pixels, grid and seconds per temporal patch as `generate` takes them: the pixels are ours
    (tests/test_qwen_pixels.py checks them against the processor); the seconds from the frames' times."""
    pixels, grid = qwen_video_pixels(media.frames.pixels, **video_bounds(model.net.config))
    times = media.frames.times
    seconds = 2 * (times[-1] - times[0]) / (len(times) - 1)
    return {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid]),
            "second_per_grid_ts": torch.tensor([seconds])}


def generated(net, rows: list[list[int]], max_new_tokens: int, **inputs) -> list[list[int]]:
    """transformers' greedy answers for left-padded rows, each cut at its EOS."""
    width = max(map(len, rows))
    ids = torch.tensor([[net.config.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    types = (ids == net.config.image_token_id).int() + 2 * (ids == net.config.video_token_id).int()
    out = net.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, max_new_tokens=max_new_tokens,
                       do_sample=False, **inputs)[:, width:].tolist()
    eos = net.config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


@pytest.mark.parametrize("framing", [{"fps": 0.5}, {"frames": 5}, {"frames": 4, "start": 2.5, "end": 6}])
def test_ask_a_video_equals_generate(qwen25, loaded, reference, framing):
    window = {k: framing.pop(k) for k in ("start", "end") if k in framing}
    media = loaded.media(VIDEOS[0], **framing, **window)
    answer = loaded.ask(media, QUESTION, max_new_tokens=10)
    inputs = video_inputs(loaded, media)
    ids = expanded_ids(qwen25, chat_text(qwen25, [(QUESTION, None)]), inputs["video_grid_thw"][0])
    assert answer.tokens == generated(reference, [ids], 10, **inputs)[0]
    assert len({*answer.tokens}) > 1  # not one token repeated: the comparison has teeth


def test_fps_samples_by_time_and_the_answer_follows_the_frames(loaded):
    by_time = loaded.media(VIDEOS[0], fps=0.5)
    assert len(by_time.frames.indices) == 4  # int(9.72 s x 0.5) frames, the default minimum of 4 too
    other = loaded.ask(VIDEOS[1], QUESTION, fps=0.5, max_new_tokens=10).tokens
    assert loaded.ask(by_time, QUESTION, max_new_tokens=10).tokens != other


def test_an_image_equals_generate(qwen25, loaded, reference):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(**json.loads((qwen25 / "preprocessor_config.json").read_text()))
    pixels = processor(Image.open(IMAGE).convert("RGB"), return_tensors="pt")
    answer = loaded.ask(IMAGE, "What is shown in this image?", max_new_tokens=10)
    ids = expanded_ids(qwen25, chat_text(qwen25, [("What is shown in this image?", None)], "image"),
                       pixels.image_grid_thw[0], "image")
    assert answer.tokens == generated(reference, [ids], 10, pixel_values=pixels.pixel_values,
                                      image_grid_thw=pixels.image_grid_thw)[0]


def test_a_two_turn_chat_equals_generate_on_the_whole_conversation(qwen25, loaded, reference):
    media = loaded.media(VIDEOS[0], frames=4)
    chat = loaded.chat(media)
    first = chat.ask(QUESTION, max_new_tokens=6)
    second = chat.ask("What happens next?", max_new_tokens=6)
    inputs = video_inputs(loaded, media)
    ids = expanded_ids(qwen25, chat_text(qwen25, [(QUESTION, None)]), inputs["video_grid_thw"][0])
    assert first.tokens == generated(reference, [ids], 6, **inputs)[0]
    # turn 2: turn 1's ids, its answer, then what the template writes after an answer and the next question
    both = chat_text(qwen25, [(QUESTION, "ANSWER"), ("What happens next?", None)])
    after = both[both.index("ANSWER") + len("ANSWER"):].removeprefix("<|im_end|>")
    tokenizer = loaded.tokenizer
    eos = [] if first.tokens[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    rows = ids + first.tokens + eos + tokenizer(after, add_special_tokens=False).input_ids
    assert second.tokens == generated(reference, [rows], 6, **inputs)[0]


def test_a_caption_batch_of_prompts_of_different_lengths_equals_generate(qwen25, loaded, reference):
    questions = [QUESTION, "What is happening in the video, and why is it funny?"]
    records = list(loaded.caption(VIDEOS, questions, frames=4, max_new_tokens=8, batch_size=2))
    medias = [loaded.media(video, frames=4) for video in VIDEOS]
    inputs = [video_inputs(loaded, media) for media in medias]
    rows = [expanded_ids(qwen25, chat_text(qwen25, [(q, None)]), i["video_grid_thw"][0])
            for q, i in zip(questions, inputs)]
    batched = {key: torch.cat([i[key] for i in inputs]) for key in inputs[0]}
    assert [r["tokens"] for r in records] == generated(reference, rows, 8, **batched)


def test_features_equal_get_video_features(loaded, reference):
    media = loaded.media(VIDEOS[1], frames=4)
    inputs = video_inputs(loaded, media)
    with torch.inference_mode():
        theirs = reference.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert torch.allclose(loaded.features(media), theirs.pooler_output[0], atol=1e-5)


def test_positions_for_the_context_check_count_the_frames_tokens(loaded):
    """--frames beyond what the context holds is refused before reading, with the most that fit; a 640 x 360
    frame pair takes 3 x 5 merged tokens at the fixture's pixel bounds."""
    config = loaded.net.config
    assert loaded.family.video.positions(config, 4, (360, 640)) == 2 * 15
    assert loaded.family.video.positions(config, 5, (360, 640)) == 3 * 15  # an odd count: the last frame repeated


def hub_layout(saved, directory):
    """The checkpoint as the hub publishes Qwen2.5-VL: config.json flat (the text model's fields at the top, M-RoPE
    in `rope_scaling`), the weights under their pre-5 names (`model.layers.*`, `visual.*`) in two shards."""
    from safetensors.torch import load_file, save_file

    directory.mkdir()
    config = json.loads((saved / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**config, **{k: v for k, v in text.items() if k not in ("model_type", "architectures")},
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}, "rope_theta": rope["rope_theta"],
            "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(flat))
    weights = load_file(saved / "model.safetensors")
    renamed = {name.replace("model.language_model.", "model.").replace("model.visual.", "visual."): tensor
               for name, tensor in weights.items()}
    names, index = sorted(renamed), {}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        file = f"model-0000{part}-of-00002.safetensors"
        save_file({name: renamed[name].contiguous() for name in chunk}, directory / file, metadata={"format": "pt"})
        index.update({name: file for name in chunk})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for file in saved.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            (directory / file.name).write_bytes(file.read_bytes())
    return directory


def test_the_hub_layout_loads_through_m_dir(qwen25, loaded, tmp_path, cli):
    hub = hub_layout(qwen25, tmp_path / "hub")
    expected = loaded.ask(VIDEOS[0], QUESTION, frames=4, max_new_tokens=8)
    result = cli("ask", str(VIDEOS[0]), QUESTION, "-m", str(hub), "--frames", "4", "-n", "8", "--json",
                 "--device", "cpu", "--dtype", "float32")
    assert result.code == 0, result.err
    assert json.loads(result.out)["tokens"] == expected.tokens


def test_the_feature_cache_gives_back_the_grid_and_the_same_answer(qwen25):
    cached = videoqa.load(qwen25, device="cpu", dtype="float32")  # the cache dir is the test's own (conftest)
    first = cached.ask(VIDEOS[1], QUESTION, frames=4, max_new_tokens=8)
    again = cached.media(VIDEOS[1], frames=4)
    assert again.features is not None and again.frames.pixels is None  # read from the cache, nothing decoded
    assert cached.ask(again, QUESTION, max_new_tokens=8).tokens == first.tokens


def test_nf4_keeps_the_tower_and_equals_generate_under_the_same_config(qwen25, loaded):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    quantized = videoqa.load(qwen25, device="cpu", dtype="float32", quantize="nf4", cache=False)
    media = quantized.media(VIDEOS[0], frames=4)
    assert torch.equal(quantized.features(media), loaded.features(media))  # model.visual is not quantized
    bits = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=["model.visual", "lm_head"])
    net = AutoModelForImageTextToText.from_pretrained(qwen25, quantization_config=bits, device_map="cpu",
                                                      dtype=torch.float32).eval()
    inputs = video_inputs(loaded, media)
    ids = expanded_ids(qwen25, chat_text(qwen25, [(QUESTION, None)]), inputs["video_grid_thw"][0])
    assert quantized.ask(media, QUESTION, max_new_tokens=8).tokens == generated(net, [ids], 8, **inputs)[0]


@pytest.fixture(scope="module")
def qwen25_padded(tmp_path_factory):
    """The vocabulary padded to a multiple of 16, as int4's packing needs (the real one's 151,936 is)."""
    return build_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl_padded"), vocab_multiple=16)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_torchao_quantization_keeps_the_tower_and_equals_generate_under_the_same_config(qwen25_padded, quantize):
    plain = videoqa.load(qwen25_padded, device="cpu", dtype="float32", cache=False)
    quantized = videoqa.load(qwen25_padded, device="cpu", dtype="float32", quantize=quantize, cache=False)
    media = quantized.media(VIDEOS[0], frames=4)
    assert torch.equal(quantized.features(media), plain.features(media))  # model.visual is not quantized
    net = reference_torchao(qwen25_padded, quantize, ["model.visual"], 64, torch.float32)
    inputs = video_inputs(plain, media)
    ids = expanded_ids(qwen25_padded, chat_text(qwen25_padded, [(QUESTION, None)]), inputs["video_grid_thw"][0])
    expected = generated(net, [ids], 16, **inputs)[0]
    assert quantized.ask(media, QUESTION, max_new_tokens=16).tokens == expected and len(set(expected)) > 1


def test_multiple_choice_scores_equal_the_model_forward(qwen25, loaded, reference):
    """M-RoPE: each option's tokens sit after the prompt's largest position, as in the model forward."""
    options = ["tennis", "golf", "a soccer ball game on grass"]
    media = loaded.media(VIDEOS[0], frames=4)
    answer = loaded.ask(media, QUESTION, choices=options)
    inputs = video_inputs(loaded, media)
    ids = expanded_ids(qwen25, chat_text(qwen25, [(QUESTION, None)]), inputs["video_grid_thw"][0])
    video = reference.config.video_token_id
    for scored in answer.choices:
        types = torch.tensor([[2 if t == video else 0 for t in ids] + [0] * len(scored["tokens"])])
        expected = reference_logprob(reference, ids, scored["tokens"], mm_token_type_ids=types, **inputs)
        assert abs(scored["logprob"] - expected) < 1e-4, (scored, expected)
    assert len({len(c["tokens"]) for c in answer.choices}) > 1
    assert answer.text == max(answer.choices, key=lambda c: c["logprob"])["text"]


def test_find_scores_the_yes_and_no_tokens_after_the_chatml_newline(qwen25, loaded, reference):
    """ChatML's assistant turn ends in a newline, so the answer's first token is "Yes" (no leading space)."""
    from videoqa.families import FIND

    (found,) = loaded.find(VIDEOS[1], "a baby", count=1, frames=4)
    media = loaded.media(VIDEOS[1], frames=4)
    inputs = video_inputs(loaded, media)
    question = FIND.format(query="a baby")
    ids = torch.tensor([expanded_ids(qwen25, chat_text(qwen25, [(question, None)]), inputs["video_grid_thw"][0])])
    types = 2 * (ids == reference.config.video_token_id).int()
    with torch.inference_mode():
        logits = reference(input_ids=ids, mm_token_type_ids=types, **inputs).logits[0, -1]
    yes, no = (loaded.tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("Yes", "No"))
    assert found["score"] == pytest.approx(torch.sigmoid(logits[yes] - logits[no]).item(), abs=1e-5)


def test_a_timeline_answers_each_segment_as_ask_answers_its_window(loaded):
    records = list(loaded.timeline(VIDEOS[1], count=2, frames=2, max_new_tokens=6, batch_size=2))
    assert len(records) == 2
    for record in records:
        alone = loaded.ask(VIDEOS[1], loaded.preset.describe, start=record["start"], end=record["end"], frames=2,
                           max_new_tokens=6)
        assert record["tokens"] == alone.tokens


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """The tiny Qwen2.5-VL with a 160-position context: a 640 x 360 frame pair takes 15 of them."""
    directory = build_qwen2_5_vl(tmp_path_factory.mktemp("qwen_short"))
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 160
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_the_default_rate_is_capped_by_the_context_for_the_videos_frame_size(short_context, cli):
    """At --fps 2, 9.7 s would take 19 frames (10 temporal patches, 150 positions); the context leaves 160 - 64 for
    the video: 12 frames (6 patches, 90 positions) is the most, said in a note, and the answer comes."""
    result = cli("ask", str(VIDEOS[0]), QUESTION, "-m", str(short_context), "-n", "2", "--json", "--device", "cpu",
                 "--dtype", "float32", "--skip-memory-check")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert len(record["frames"]) == 12
    assert "the model's context allows 12" in result.err and record["warnings"]


def test_frames_past_the_context_are_refused_for_the_videos_own_frame_size(short_context, cli, tmp_path):
    """A 32 x 24 video's frames are scaled up to the 3,136-pixel minimum, 56 x 84 px: 2 x 3 merged tokens a
    temporal patch. 30 frames (90 positions, and the question's 41) fit the 160-position context; 60 (180) do not,
    and at most 52 do (26 patches, 156 positions); counted at the 1280 x 720 reference size, 20 would be the most."""
    from test_windows import write_grey_video

    video = tmp_path / "grey.mkv"
    write_grey_video(video)
    run = ("-m", str(short_context), "-n", "1", "--json", "--device", "cpu", "--dtype", "float32",
           "--skip-memory-check")
    fits = cli("ask", str(video), QUESTION, "--frames", "30", *run)
    assert fits.code == 0, fits.err
    assert len(json.loads(fits.out)["frames"]) == 30
    refused = cli("ask", str(video), QUESTION, "--frames", "60", *run)
    assert refused.code == 2 and refused.out == ""
    assert "the video alone needs 180 positions" in refused.err and "use at most 52 frames" in refused.err


def test_pixel_bounds_given_as_size_are_read_as_min_and_max_pixels(qwen25, loaded, tmp_path):
    """transformers 5 saves the bounds as `size` (shortest_edge, longest_edge); a file with only that gives the
    same frames as the hub's min_pixels/max_pixels (the class defaults, 128 x 28 x 28 and more, would not)."""
    import shutil

    copy = tmp_path / "sized"
    shutil.copytree(qwen25, copy)
    settings = json.loads((copy / "preprocessor_config.json").read_text())
    settings["size"] = {"shortest_edge": settings.pop("min_pixels"), "longest_edge": settings.pop("max_pixels")}
    (copy / "preprocessor_config.json").write_text(json.dumps(settings))
    sized = videoqa.load(copy, device="cpu", dtype="float32", cache=False)
    media = loaded.media(VIDEOS[0], frames=2)
    assert torch.equal(sized.features(media), loaded.features(media))


def test_logprobs_hidden_states_and_attentions_equal_generate(qwen25, loaded, reference):
    """Each token's log-probability and top 3, the hidden states (embeddings first) and the attention weights of
    the position that chose it equal `generate`'s (output_scores, hidden_states, attentions; eager attention)."""
    from qwen_fixtures import check_qwen_traced

    media = loaded.media(VIDEOS[0], frames=4)  # 2 temporal patches
    answer = loaded.ask(media, QUESTION, max_new_tokens=4, logprobs=3, hidden_states=True, attentions=True)
    inputs = video_inputs(loaded, media)
    ids = expanded_ids(qwen25, chat_text(qwen25, [(QUESTION, None)]), inputs["video_grid_thw"][0])
    check_qwen_traced(answer, reference, ids, inputs)


def test_explain_shares_sum_to_the_video_share(qwen25, loaded):
    """`explain`: the frames' shares add up to the video's share of the attention; the two frames of a temporal
    patch count its positions half each, so they get the same share; other frames, other shares."""
    media = loaded.media(VIDEOS[0], frames=4)
    answer = loaded.ask(media, QUESTION, max_new_tokens=4, attentions=True, explain=True)
    inputs = video_inputs(loaded, media)
    ids = expanded_ids(qwen25, chat_text(qwen25, [(QUESTION, None)]), inputs["video_grid_thw"][0])
    check_patch_shares(loaded, answer, ids, loaded.media(VIDEOS[0], frames=4, start=2.5, end=6), QUESTION)


def mixed_ids(directory, text: str, media, videos, images) -> list[int]:
    """The processor's way with several files: each one's pad repeated once per merged token, then the whole text
    tokenised."""
    from transformers import AutoTokenizer

    from qwen_fixtures import repeat_pad

    for medium, inputs in (("video", videos), ("image", images)):
        if inputs is not None:
            text = repeat_pad(text, inputs[f"{medium}_grid_thw"][0], medium)
    return AutoTokenizer.from_pretrained(directory)(text, add_special_tokens=False).input_ids


def test_ask_a_video_with_an_image_equals_generate_with_both_pixel_inputs(qwen25, loaded, reference):
    from qwen_fixtures import check_video_with_image

    check_video_with_image(qwen25, loaded, reference, VIDEOS[0], IMAGE, inputs_of=video_inputs, generate=generated,
                           ids_of=lambda *args: mixed_ids(qwen25, *args))


def test_an_image_then_a_video_added_equals_generate_on_the_whole_conversation(qwen25, loaded, reference):
    from qwen_fixtures import check_image_then_video

    check_image_then_video(qwen25, loaded, reference, VIDEOS[0], IMAGE, inputs_of=video_inputs, generate=generated,
                           ids_of=lambda *args: mixed_ids(qwen25, *args))
