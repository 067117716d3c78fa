"""The compiled decode step over a static cache (the CUDA path), forced on the CPU: same tokens as eager,
graphs reused across questions of one bucket, a conversation that outgrows its cache re-prefilled correctly."""

import pytest
import torch

from conftest import asset, build_video_llava, needs_assets
from videoqa.conversation import Conversation
from videoqa.decode import BUCKET, Sampling, capacity, static_cache
from videoqa.frames import read_frames

pytestmark = needs_assets
GREEDY = Sampling()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Weights large enough that every answer depends on the whole cache, lost entries included."""
    from videoqa import models

    path = build_video_llava(tmp_path_factory.mktemp("sensitive"), initializer_range=0.3)
    path, preset = models.resolve(str(path))
    return models.load(str(path), path, preset, torch.device("cpu"), torch.float32)


def answers(model, frames, questions, max_new, compile, room=None):
    """Each question's answer in one conversation (`max_new`: one budget, or one per question);
    `room` preallocates a cache that never has to grow."""
    convo = Conversation(model, frames, compile=compile)
    if room:
        convo.cache = static_cache(model.net, room)
    budgets = max_new if isinstance(max_new, list) else [max_new] * len(questions)
    return [list(convo.ask(q, n, GREEDY)) for q, n in zip(questions, budgets)], convo


def test_compiled_static_decode_equals_eager(model):
    from torch._dynamo.utils import counters

    frames = read_frames(asset("videos/videollava_sample_demo_1.mp4"), 8)
    eager, _ = answers(model, frames, ["Why is this video funny?"], 24, compile=False)
    compiled, convo = answers(model, frames, ["Why is this video funny?"], 24, compile=True)
    assert compiled == eager
    assert capacity(convo.cache) == BUCKET  # prompt (58) + 24 new tokens, rounded up

    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the step really was compiled
    question = "What colour is the book that the baby is holding, and why?"
    assert answers(model, frames, [question], 24, True)[0] == answers(model, frames, [question], 24, False)[0]
    assert counters["stats"]["unique_graphs"] == graphs  # same bucket: the compiled graph was reused

    # 58 + 24 tokens fit a 256-token cache; the second turn's 200 more need 512: the cache grows mid-conversation
    questions, budgets = ["Why is this video funny?", "Tell me more."], [24, 200]
    eager, _ = answers(model, frames, questions, budgets, compile=False, room=4 * BUCKET)
    compiled, convo = answers(model, frames, questions, budgets, compile=True)
    assert compiled == eager and capacity(convo.cache) == 2 * BUCKET
    assert convo.timings["prefill_tokens"] < 20  # the grown cache kept the first turn: only the new tokens ran
