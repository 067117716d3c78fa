"""Stop strings (`--stop TEXT`, repeatable; API `stop=[...]`): the answer ends as soon as its decoded text holds
TEXT; TEXT and what follows are not part of the answer (streamed or not); `tokens` are the ids produced, up to the
one that completed TEXT. In batched caption each row stops on its own; TEXT may span tokens. The unstopped answers
equal transformers' `generate` (tests elsewhere), so where each stop falls is computed here from those tokens."""

import io
import json
import sys

import pytest

from conftest import asset, needs_assets, reference_generate
from videoqa.frames import read_frames

pytestmark = needs_assets
VIDEO, OTHER = asset("videos/videollava_sample_demo_1.mp4"), asset("videos/videollava_sample_demo_3.mp4")
QUESTION = "Why is this video funny?"
model = pytest.fixture(lambda tiny_loaded: tiny_loaded, name="model")  # the session's tiny Video-LLaVA, loaded


def spanning(model, tokens: list[int], at: int) -> str:
    """A stop string across the boundary of tokens `at` - 1 and `at`: the last character before it and the first two
    of the token after it in the decoded answer."""
    before = model.tokenizer.decode(tokens[:at], skip_special_tokens=True)
    after = model.tokenizer.decode(tokens[: at + 1], skip_special_tokens=True)
    assert after.startswith(before) and len(after) >= len(before) + 2
    return after[len(before) - 1 : len(before) + 2]


def cut_where(model, tokens: list[int], stop: str) -> tuple[list[int], str]:
    """By hand: the fewest tokens whose text holds `stop`, and the text before it."""
    for n in range(1, len(tokens) + 1):
        text = model.tokenizer.decode(tokens[:n], skip_special_tokens=True)
        if stop in text:
            return tokens[:n], text[: text.index(stop)].strip()
    raise AssertionError(f"{stop!r} is not in the answer")


def test_a_stop_string_across_tokens_ends_the_answer(model, tiny_model):
    whole = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=8)
    assert whole.tokens == reference_generate(tiny_model, read_frames(VIDEO, 2), QUESTION, 8)
    stop = spanning(model, whole.tokens, 4)
    tokens, text = cut_where(model, whole.tokens, stop)
    stopped = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=8, stop=[stop, "never in it"])
    assert stopped.tokens == tokens == whole.tokens[:5] and stopped.text == text and stop not in stopped.text
    assert stop not in model.tokenizer.decode(tokens[:4]) and stop not in model.tokenizer.decode(tokens[4:5])


def test_the_stream_never_shows_the_stop_string(cli, model, tiny_model):
    whole = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=8)
    stop = spanning(model, whole.tokens, 3)
    args = ["ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 2, "-n", 8, "--stop", stop]
    streamed, record = cli(*args), json.loads(cli(*args, "--json").out)
    tokens, text = cut_where(model, whole.tokens, stop)
    assert streamed.code == 0 and streamed.out == text + "\n" and record["answer"] == text
    assert record["tokens"] == tokens


def test_batched_caption_rows_stop_on_their_own(cli, model, tiny_model):
    first = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=8)
    second = model.ask(OTHER, QUESTION, frames=2, max_new_tokens=8)
    stop = spanning(model, first.tokens, 2)
    assert stop not in model.tokenizer.decode(second.tokens, skip_special_tokens=True)
    result = cli("caption", VIDEO, OTHER, "-m", tiny_model, "--frames", 2, "-n", 8, "-b", 2, "--prompt", QUESTION,
                 "--stop", stop)
    records = [json.loads(line) for line in result.out.splitlines()]
    tokens, text = cut_where(model, first.tokens, stop)
    assert records[0]["tokens"] == tokens and records[0]["answer"] == text
    assert records[1]["tokens"] == second.tokens and records[1]["answer"] == second.text  # the other row went on


def test_chat_and_timeline_take_stop(cli, model, tiny_model, monkeypatch, tmp_path):
    whole = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=8)
    stop = spanning(model, whole.tokens, 3)
    tokens, text = cut_where(model, whole.tokens, stop)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{QUESTION}\n".encode())))
    turn = json.loads(cli("chat", VIDEO, "-m", tiny_model, "--frames", 2, "-n", 8, "--stop", stop, "--json").out)
    assert turn["tokens"] == tokens and turn["answer"] == text
    out = tmp_path / "timeline.jsonl"
    assert cli("timeline", VIDEO, "-m", tiny_model, "--frames", 2, "-n", 8, "--segments", 2, "--stop", "e",
               "--out", out).code == 0
    for record in map(json.loads, out.read_text().splitlines()):
        assert "e" not in record["answer"]
        assert record["tokens"] == cut_where(model, record["tokens"], "e")[0] or len(record["tokens"]) == 8


def test_an_empty_stop_string_is_refused(cli, tiny_model):
    from conftest import assert_clean_failure
    from videoqa.errors import Exit

    assert_clean_failure(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--stop", ""), Exit.USAGE, "stop")
