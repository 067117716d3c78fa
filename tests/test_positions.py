"""Positions are the family's: the decode loop takes them from `Family.positions` for a prompt, a conversation's
follow-up (after what the cache holds) and left-padded batch rows; a family registered with its own function is
asked for each, and what it returns is what the model is run with."""

import dataclasses

import pytest
import torch

import videoqa
from conftest import asset, needs_assets
from videoqa import families
from videoqa.families import text_positions

pytestmark = needs_assets
VIDEOS = [asset("videos/videollava_sample_demo_1.mp4"), asset("videos/videollava_sample_demo_3.mp4")]


@pytest.fixture
def asked(monkeypatch, tiny_model):
    """The tiny model under a registered copy of its family whose positions function records each call (it is handed the whole rows, and the tokens the cache holds)."""
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))  # put back after the test
    calls = []

    def positions(net, ids, padding, past, visuals):
        calls.append({"length": ids.shape[1], "rows": ids.shape[0], "padded": padding is not None, "past": past})
        return text_positions(ids[:, past:], padding, past)

    videoqa.register(dataclasses.replace(videoqa.family("video_llava"), positions=positions))
    return videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False), calls


def test_prompt_follow_up_and_batch_rows_take_the_familys_positions(asked):
    model, calls = asked
    chat = model.chat(VIDEOS[0])
    first = chat.ask("Why is this video funny?", max_new_tokens=4)
    chat.ask("Why?", max_new_tokens=3)
    prompt, follow = calls
    assert prompt == {"length": first.timings["prefill_tokens"], "rows": 1, "padded": False, "past": 0}
    held = first.timings["prefill_tokens"] + len(first.tokens) - 1  # the last answer token was never fed back
    assert follow["past"] == held and not follow["padded"]
    calls.clear()
    list(model.caption(VIDEOS, ["Why?", "What happens in this video, and why?"], max_new_tokens=2, batch_size=2))
    assert calls == [{"length": calls[0]["length"], "rows": 2, "padded": True, "past": 0}]


def test_one_dimensional_positions_by_hand():
    ids = torch.zeros(2, 4, dtype=torch.long)
    plain = text_positions(ids, None, 5)
    assert plain.prompt.tolist() == [[5, 6, 7, 8]] * 2 and plain.next.tolist() == [[9], [9]]
    padded = text_positions(ids, torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 0)
    assert padded.prompt.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]] and padded.next.tolist() == [[2], [4]]
