"""`videoqa chat` through a pipe: multi-turn tokens equal transformers' generate on the full sequence,
follow-ups prefill only their new tokens, the vision tower runs once per video."""

import json

import pytest

from conftest import (asset, build_video_llava, needs_assets, reference_continue, reference_net, reference_pixels,
                      reference_prompt)
from videoqa.frames import read_frames

pytestmark = needs_assets
VIDEO = "videos/videollava_sample_demo_1.mp4"


@pytest.fixture
def tower_calls(counted):
    return counted["towers"]


def turns(result):
    return [json.loads(line) for line in result.out.splitlines()]


@pytest.mark.parametrize("model", ["tiny_model", "tiny_next_video"])
def test_second_turn_equals_generate_on_the_full_sequence(chat, request, model, tower_calls):
    checkpoint = request.getfixturevalue(model)
    q1, q2 = "Why is this video funny?", "What is the baby holding?"
    result = chat([q1, q2], asset(VIDEO), "-m", checkpoint, "-n", 12, "--json")
    assert result.code == 0, result
    first, second = turns(result)
    assert tower_calls == [8]  # one tower call (8 frames) for two turns
    assert (first["turn"], second["turn"]) == (1, 2)

    net, tokenizer = reference_net(checkpoint)
    frames = read_frames(asset(VIDEO), 8)
    pixels = reference_pixels(net, list(frames.pixels))[None]
    prompt = reference_prompt(net, tokenizer, frames, q1)
    assert first["tokens"] == reference_continue(net, prompt, 12, pixel_values_videos=pixels)
    eos = [2] if first["tokens"][-1] != 2 else []
    follow = tokenizer(f"USER: {q2} ASSISTANT:", add_special_tokens=False).input_ids
    full = [*prompt, *first["tokens"], *eos, *follow]
    assert second["tokens"] == reference_continue(net, full, 12, pixel_values_videos=pixels)

    assert first["timings"]["prefill_tokens"] == len(prompt)
    # The cache holds the prompt and every answer token but the last, which was never fed back.
    assert second["timings"]["prefill_tokens"] == len(full) - (len(prompt) + len(first["tokens"]) - 1)
    assert second["timings"]["prefill_tokens"] == 1 + len(eos) + len(follow)


def test_reset_forgets_the_conversation_but_not_the_video(chat, tiny_model, tower_calls):
    result = chat(["Why?", "And then?", "/reset", "Why?"], asset(VIDEO), "-m", tiny_model, "-n", 6, "--json")
    first, second, after_reset = turns(result)
    assert after_reset["tokens"] == first["tokens"] and after_reset["turn"] == 1
    assert after_reset["timings"]["prefill_tokens"] == first["timings"]["prefill_tokens"]
    assert tower_calls == [8]


def test_video_switch_encodes_the_new_video(chat, tiny_model, tower_calls):
    other = asset("videos/videollava_sample_demo_9.mp4")
    result = chat(["Why?", f"/video {other}", "Why?"], asset(VIDEO), "-m", tiny_model, "-n", 6, "--json")
    first, second = turns(result)
    assert second["turn"] == 1 and second["video"] == str(other)
    assert len(tower_calls) == 2


def test_commands_frames_set_save_and_errors_keep_the_session(chat, tiny_model, tmp_path):
    md, js = tmp_path / "talk.md", tmp_path / "talk.json"
    image = asset("images/videollava_desert.jpg")
    lines = ["/frames", "/set temperature 2", "/set top_p 0", "/set max_new_tokens 4", "/bogus", "/video /nope.mp4",
             '/video "unbalanced', f"/video {image}", f"/image {asset(VIDEO)}", "\udcff\udcfe?", "Why?",
             f"/save {md}", f"/save {js}", "/set", "/exit", "never asked"]
    result = chat(lines, asset(VIDEO), "-m", tiny_model, "--json", "--no-compile")
    # stdout holds the answers only, as JSON; what commands show goes to stderr
    assert [json.loads(line)["question"] for line in result.out.splitlines()] == ["Why?"]
    shown = result.err.splitlines()
    assert shown[:8] == [f"frame {i:>6}  {i / 25:8.3f} s" for i in [0, 34, 69, 103, 138, 172, 207, 242]]
    errors = [line for line in shown if line.startswith("error:")]
    assert len(errors) == 7, errors
    assert "top_p" in errors[0] and "bogus" in errors[1] and "/nope.mp4" in errors[2]
    assert "quotation" in errors[3] and "an image: /image" in errors[4] and "not an image" in errors[5]
    assert "not valid UTF-8" in errors[6]
    assert result.code == 2  # the first failure was a usage error
    saved = json.loads(js.read_text())
    assert len(saved["turns"]) == 1 and len(saved["turns"][0]["tokens"]) == 4
    assert saved["turns"][0]["answer"] in md.read_text() and "**You:** Why?" in md.read_text()
    settings = [line for line in shown if line.startswith("temperature")]
    assert "temperature 2.0" in settings[-1] and "max_new_tokens 4" in settings[-1]


def test_question_before_any_video(chat, tiny_model):
    result = chat(["Why?"], "-m", tiny_model)
    assert result.out == "" and "/video PATH" in result.err and result.code == 2


def test_context_overflow_is_reported_and_reset_recovers(chat, tmp_path):
    small = build_video_llava(tmp_path / "small", context=64)  # 8 frames x 5 tokens + ~20 prompt tokens
    result = chat(["Why is this funny?", "And why is that?", "/reset", "Why is this funny?"], asset(VIDEO),
                  "-m", small, "-n", 4, "--json")
    records = turns(result)
    assert [r["turn"] for r in records] == [1, 1]
    assert "conversation too long" in result.err and "/reset" in result.err
    assert records[0]["tokens"] == records[1]["tokens"]


def test_image_answer_equals_generate_with_image_pixels(cli, tiny_model):
    from PIL import Image

    path = asset("images/videollava_extreme_ironing.jpg")
    result = cli("ask", path, "What is unusual about this image?", "-m", tiny_model, "-n", 12, "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    assert record["frames"] == []

    net, tokenizer = reference_net(tiny_model)
    patches = (net.config.vision_config.image_size // net.config.vision_config.patch_size) ** 2
    text = "USER: " + "<image>" * patches + "\nWhat is unusual about this image? ASSISTANT:"
    ids = [1, *tokenizer(text, add_special_tokens=False).input_ids]
    pixels = reference_pixels(net, [Image.open(path).convert("RGB")])
    assert record["tokens"] == reference_continue(net, ids, 12, pixel_values=pixels)
    assert record["timings"]["prefill_tokens"] == len(ids)


def test_set_out_of_range_seed_and_tiny_temperature_keep_the_session(chat, tiny_model):
    lines = ["/set seed 1180591620717411303424", "/set temperature nan", "/set temperature 1e-40", "/set seed 7",
             "Why?", "/set temperature 0", "/reset", "Why?"]
    result = chat(lines, asset(VIDEO), "-m", tiny_model, "-n", 6, "--json")
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "seed" in errors[0] and "2^64-1" in errors[0] and "temperature" in errors[1]
    tiny, greedy = turns(result)
    assert tiny["tokens"] == greedy["tokens"]  # as the temperature goes to 0, sampling goes to the argmax


def test_a_line_over_1_mb_is_refused_and_the_session_goes_on(chat, tiny_model):
    result = chat(["why " * 300_000, "Why?"], asset(VIDEO), "-m", tiny_model, "-n", 3, "--json")
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 MB" in errors[0] and result.code == 2
    assert [json.loads(line)["question"] for line in result.out.splitlines()] == ["Why?"]


def test_video_and_image_say_what_they_loaded_and_save_counts_turns(chat, tiny_model, tmp_path):
    other, image = asset("videos/videollava_sample_demo_9.mp4"), asset("images/videollava_desert.jpg")
    lines = [f"/video {other} 1 3", "Why?", f"/save {tmp_path / 'one.md'}", f"/image {image}", f"/video {other}"]
    result = chat(lines, asset(VIDEO), "-m", tiny_model, "-n", 2, "--json")
    assert result.code == 0, result
    shown = result.err.splitlines()
    window = next(line for line in shown if line.startswith(f"video {other}"))
    record = turns(result)[0]
    times = [f["time"] for f in record["frames"]]
    assert "8 frames of 00:01–00:03" in window and f"{times[0]:.2f}–{times[-1]:.2f} s" in window
    assert all(1 <= t < 3 for t in times)
    from PIL import Image

    width, height = Image.open(image).size
    assert any(line.startswith(f"image {image}: {width} × {height}") for line in shown)
    assert any(line.startswith(f"video {other}: 8 frames of the whole video") for line in shown)
    assert f"saved 1 turn to {tmp_path / 'one.md'}" in shown
