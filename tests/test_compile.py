"""The compiled decode step over a static cache (the CUDA path), forced on the CPU: same tokens as eager,
graphs reused across questions of one bucket, a conversation that outgrows its cache re-prefilled correctly."""

import pytest

import videoqa
from conftest import asset, build_video_llava, needs_assets
from videoqa.decode import BUCKET, capacity, static_cache

pytestmark = needs_assets


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Weights large enough that every answer depends on the whole cache, lost entries included."""
    path = build_video_llava(tmp_path_factory.mktemp("sensitive"), initializer_range=0.3)
    return videoqa.load(path, device="cpu", dtype="float32", cache=False)


def answers(model, frames, questions, max_new, compile, room=None):
    """Each question's answer in one conversation (`max_new`: one budget, or one per question);
    `room` preallocates a cache that never has to grow. `compile` forces the CUDA path's compiled step."""
    model.compiled = compile
    chat = model.chat(frames)
    if room:
        chat.cache = static_cache(model.net.config.text_config, room)
    budgets = max_new if isinstance(max_new, list) else [max_new] * len(questions)
    return [chat.ask(q, max_new_tokens=n).tokens for q, n in zip(questions, budgets)], chat


def test_compiled_static_decode_equals_eager(model):
    from torch._dynamo.utils import counters

    frames = model.media(asset("videos/videollava_sample_demo_1.mp4"))
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
    assert convo.answers[-1].timings["prefill_tokens"] < 20  # the grown cache kept the first turn: only new tokens ran
