"""The compiled decode step over a static cache (the CUDA path), forced on the CPU: same tokens as eager,
graphs reused across questions of one bucket, a conversation that outgrows its cache re-prefilled correctly."""

import pytest
import torch

from conftest import asset, needs_assets
from videoqa.conversation import Conversation
from videoqa.decode import BUCKET, Sampling, capacity
from videoqa.frames import read_frames

pytestmark = needs_assets
GREEDY = Sampling()


@pytest.fixture(scope="module")
def model(tiny_model):
    from videoqa import models

    path, preset = models.resolve(str(tiny_model))
    return models.load(str(tiny_model), path, preset, torch.device("cpu"), torch.float32)


def answers(model, frames, questions, max_new, compile):
    convo = Conversation(model, frames, compile=compile)
    return [list(convo.ask(q, max_new, GREEDY)) for q in questions], convo


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

    questions = ["Why is this video funny?", "Tell me more."]  # the second turn needs a 512-token cache
    eager, _ = answers(model, frames, questions, 200, compile=False)
    compiled, convo = answers(model, frames, questions, 200, compile=True)
    assert compiled == eager and capacity(convo.cache) == 2 * BUCKET
