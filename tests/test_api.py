"""The Python API (`import videoqa`): the README's example, a family added through the public registration point,
caption's batches on the one decode path (static cache, left padding)."""

import dataclasses
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

import videoqa
from conftest import asset, needs_assets, reference_generate
from videoqa.frames import read_frames

pytestmark = needs_assets
VIDEOS = [asset(f"videos/{name}") for name in
          ("videollava_sample_demo_1.mp4", "videollava_sample_demo_3.mp4", "videollava_sample_demo_9.mp4")]


def test_the_documented_example_runs(tiny_model, capsys):
    docs = (Path(__file__).parents[1] / "docs" / "python-api.md").read_text()
    code = re.search(r"# The Python API\n.*?```python\n(.*?)```", docs, re.S).group(1)
    code = code.replace('"video-llava-7b"', repr(str(tiny_model))).replace('"clip.mp4"', repr(str(VIDEOS[0])))
    code = code.replace('"a.mp4"', repr(str(VIDEOS[1]))).replace('"b.mp4"', repr(str(VIDEOS[2])))
    code = code.replace('"photo.jpg"', repr(str(asset("images/videollava_desert.jpg"))))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert str(VIDEOS[1]) in printed and str(VIDEOS[2]) in printed


def test_ask_stream_chat_features_and_errors(tiny_model):
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    answer = model.ask(VIDEOS[0], "Why is this video funny?", max_new_tokens=8)
    assert answer.tokens == reference_generate(tiny_model, read_frames(VIDEOS[0], 8), "Why is this video funny?", 8)
    assert answer.record()["tokens"] == answer.tokens and answer.frames[1] == {"index": 34, "time": 1.36}
    assert "".join(model.stream(VIDEOS[0], "Why is this video funny?", max_new_tokens=8)).strip() == answer.text
    chat = model.chat(VIDEOS[0])
    assert chat.ask("Why is this video funny?", max_new_tokens=8).tokens == answer.tokens
    assert chat.ask("Why?", max_new_tokens=4).timings["prefill_tokens"] < 20  # a follow-up prefills only itself
    assert model.features(VIDEOS[0]).shape == (8 * 5, 64)  # 8 frames x (4 patches + CLS), hidden 64
    with pytest.raises(videoqa.VideoQAError) as error:
        model.ask(VIDEOS[0], "Why?", temperature=-1)
    assert error.value.exit_code == 2 and "temperature" in str(error.value)
    with pytest.raises(videoqa.VideoQAError) as error:
        model.ask(VIDEOS[0].with_name("missing.mp4"), "Why?")
    assert error.value.exit_code == 3


def test_wrong_arguments_are_videoqa_errors(tiny_model):
    """Through the API as through the CLI: a bad argument is a VideoQAError with exit code 2, never another
    exception, and a value the CLI refuses is not quietly replaced by a default."""
    for load in ({"device": "gpu"}, {"dtype": "int8"}):
        with pytest.raises(videoqa.VideoQAError) as error:
            videoqa.load(tiny_model, **load)
        assert error.value.exit_code == 2 and str(next(iter(load.values()))) in str(error.value)
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    for call in (lambda: model.features(VIDEOS[0], frames=0), lambda: model.features(VIDEOS[0], frames=-5),
                 lambda: model.features(VIDEOS[0], frames=2.5), lambda: model.ask(VIDEOS[0], None),
                 lambda: list(model.caption([VIDEOS[0]], batch_size=0)),
                 lambda: list(model.timeline(VIDEOS[0], batch_size=-1))):
        with pytest.raises(videoqa.VideoQAError) as error:
            call()
        assert error.value.exit_code == 2
    one = list(model.caption(VIDEOS[0], prompt=None, max_new_tokens=2, frames=2))  # one path; the default prompt
    assert len(one) == 1 and one[0]["error"] is None and one[0]["question"] == "Describe this video."


def test_import_videoqa_does_not_import_torch():
    import subprocess

    code = "import sys, videoqa; print('torch' in sys.modules, 'transformers' in sys.modules, videoqa.VideoQAError)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["False", "False"]


@pytest.fixture
def fake_family(tiny_model, tmp_path, monkeypatch):
    """A checkpoint of a family that only this test knows: a renamed copy of the Video-LLaVA entry, registered
    through the public registration point, pointing at the same class."""
    from videoqa import families

    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))  # forget it after the test
    videoqa.register(dataclasses.replace(videoqa.family("video_llava"), name="fake_llava"))
    fake = tmp_path / "fake"
    shutil.copytree(tiny_model, fake)
    config = fake / "config.json"
    config.write_text(config.read_text().replace('"video_llava"', '"fake_llava"'))
    return fake


def test_a_registered_family_runs_ask_chat_and_caption(cli, tiny_model, fake_family, monkeypatch):
    expected = json.loads(cli("ask", VIDEOS[0], "Why?", "-m", tiny_model, "-n", 6, "--json").out)["tokens"]
    asked = cli("ask", VIDEOS[0], "Why?", "-m", fake_family, "-n", 6, "--json")
    assert asked.code == 0 and json.loads(asked.out)["tokens"] == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO("Why?\nAnd then?\n"))
    chatted = cli("chat", VIDEOS[0], "-m", fake_family, "-n", 6, "--json")
    turns = [json.loads(line) for line in chatted.out.splitlines()]
    assert chatted.code == 0 and turns[0]["tokens"] == expected and turns[1]["turn"] == 2
    captioned = cli("caption", VIDEOS[0], VIDEOS[1], "-m", fake_family, "-n", 6, "--prompt", "Why?")
    assert captioned.code == 0 and json.loads(captioned.out.splitlines()[0])["tokens"] == expected


def test_an_unknown_family_is_an_error(cli, tiny_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"video_llava"', '"fake_llava"'))
    result = cli("ask", VIDEOS[0], "Why?", "-m", other)
    assert result.code == videoqa.Exit.MODEL and "fake_llava" in result.err and "video_llava" in result.err


def test_caption_batches_use_the_static_cache_and_equal_batch_1_and_generate(cli, tiny_model, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a DynamicCache was built")

    monkeypatch.setattr(transformers.DynamicCache, "__init__", refuse)
    runs = {}
    for size in (1, 4):
        result = cli("caption", *VIDEOS, "-m", tiny_model, "-n", 10, "-b", size, "--prompt", "Why?")
        assert result.code == 0, result
        runs[size] = [json.loads(line)["tokens"] for line in result.out.splitlines()]
    assert runs[1] == runs[4]
    monkeypatch.undo()
    assert runs[4][2] == reference_generate(tiny_model, read_frames(VIDEOS[2], 8), "Why?", 10)


def test_one_prompt_per_video_left_pads_the_batch(tiny_model):
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    prompts = ["Why?", "What is the person in this video doing, and where?", "Describe it."]
    batched = [r["tokens"] for r in model.caption(VIDEOS, prompts, batch_size=3, max_new_tokens=10)]
    alone = [model.ask(video, prompt, max_new_tokens=10).tokens for video, prompt in zip(VIDEOS, prompts)]
    assert batched == alone and len({len(p) for p in prompts}) == 3
    with pytest.raises(videoqa.VideoQAError, match="2 prompts for 3 videos"):
        list(model.caption(VIDEOS, prompts[:2]))


def test_stopping_a_stream_drops_the_turn(tiny_model):
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    chat = model.chat(VIDEOS[0])
    pieces = chat.stream("Why is this video funny?", max_new_tokens=20)
    next(pieces), next(pieces)
    pieces.close()  # as Ctrl-C in chat does
    assert chat.answers == [] and chat.ask("Why?", max_new_tokens=4).tokens == model.ask(
        VIDEOS[0], "Why?", max_new_tokens=4).tokens

