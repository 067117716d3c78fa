"""Every bad input: one line on stderr naming the problem, a documented non-zero exit code, nothing on stdout."""

import shutil
import wave

import pytest

from conftest import assert_clean_failure, asset, needs_assets
from videoqa.errors import Exit

QUESTION = "What happens?"


@pytest.fixture
def video():
    if not asset("videos").is_dir():
        pytest.skip("../shared/assets is not beside the checkout")
    return asset("videos/videollava_sample_demo_1.mp4")


def bad_file(tmp_path, kind):
    path = tmp_path / f"input.{kind}"
    if kind == "txt":
        path.write_text("this is not a video\n")
    elif kind == "bin":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wav":  # audio only
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
            w.writeframes(b"\x00\x10" * 8000)
    elif kind == "m4a":  # audio only, in an MP4 container
        import av
        import numpy as np

        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.rate = 16000
            for packet in [*stream.encode(frame), *stream.encode()]:
                container.mux(packet)
    elif kind == "mp4":  # truncated to its first 30 kB
        path.write_bytes(asset("videos/videollava_sample_demo_1.mp4").read_bytes()[:30000])
    return path


@needs_assets
@pytest.mark.parametrize("kind", ["txt", "bin", "wav", "m4a", "mp4"])
def test_not_a_video(cli, tiny_model, tmp_path, kind):
    result = cli("ask", bad_file(tmp_path, kind), QUESTION, "-m", tiny_model)
    assert_clean_failure(result, Exit.INPUT, "input.")


def test_missing_file(cli, tmp_path):
    assert_clean_failure(cli("ask", tmp_path / "nope.mp4", QUESTION), Exit.INPUT, "nope.mp4", "no such file")


def test_directory(cli, tmp_path):
    assert_clean_failure(cli("ask", tmp_path, QUESTION), Exit.INPUT, "directory")


def test_empty_file(cli, tmp_path):
    assert_clean_failure(cli("ask", bad_file(tmp_path, "empty"), QUESTION), Exit.INPUT, "empty")


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question(cli, video, question):
    assert_clean_failure(cli("ask", video, question), Exit.USAGE, "question is empty")


def test_question_too_long_for_the_context(cli, tiny_model, video):
    result = cli("ask", video, "why " * 5000, "-m", tiny_model)
    assert_clean_failure(result, Exit.USAGE, "too long", "4096")


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--frames", "0", ["--frames"]),
        ("--max-new-tokens", "-1", ["--max-new-tokens"]),
        ("--temperature", "-0.5", ["--temperature"]),
        ("--top-p", "0", ["--top-p"]),
        ("--top-p", "1.5", ["--top-p"]),
        ("--top-k", "-1", ["--top-k"]),
        ("--device", "tpu", ["--device", "tpu"]),
        ("--dtype", "int3", ["--dtype"]),
    ],
)
def test_bad_option_values(cli, video, option, value, words):
    assert_clean_failure(cli("ask", video, QUESTION, option, value), Exit.USAGE, *words)


def test_unknown_preset(cli, video):
    assert_clean_failure(cli("ask", video, QUESTION, "-m", "video-llava-99b"), Exit.MODEL, "video-llava-99b")


def test_missing_model_directory(cli, video, tmp_path):
    assert_clean_failure(cli("ask", video, QUESTION, "-m", tmp_path / "absent"), Exit.MODEL, "does not exist")


def test_empty_model_directory(cli, video, tmp_path):
    assert_clean_failure(cli("ask", video, QUESTION, "-m", tmp_path), Exit.MODEL, "config.json")


def test_truncated_weights(cli, video, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_clean_failure(cli("ask", video, QUESTION, "-m", broken), Exit.MODEL, "truncated")


def test_weights_that_are_not_safetensors_are_refused(cli, video, tiny_model, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert_clean_failure(cli("ask", video, QUESTION, "-m", pickled), Exit.MODEL, "safetensors")


def test_unsupported_architecture(cli, video, tiny_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = other / "config.json"
    config.write_text(config.read_text().replace('"video_llava"', '"gpt2"'))
    supported = ["video_llava", "llava_next_video", "llava_next"]
    assert_clean_failure(cli("ask", video, QUESTION, "-m", other), Exit.MODEL, "gpt2", *supported)


def test_preset_not_in_the_cache_while_offline(cli, video, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("ask", video, QUESTION)
    assert_clean_failure(result, Exit.MODEL, "LanguageBind/Video-LLaVA-7B-hf", "hf download")


def test_cuda_requested_without_cuda(cli, video):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clean_failure(cli("ask", video, QUESTION, "--device", "cuda"), Exit.DEVICE, "cuda")


def test_too_many_frames_refused_before_decoding(cli, tiny_model, video, tmp_path):
    # 100000 frames x 5 positions (28 px tower: 4 patches + CLS) against a 4096-token context
    result = cli("ask", video, QUESTION, "-m", tiny_model, "--frames", 100000)
    assert_clean_failure(result, Exit.USAGE, "--frames 100000", "500000", "at most 819 frames")
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video\n")  # decoding it first would end with exit 3
    result = cli("ask", not_a_video, QUESTION, "-m", tiny_model, "--frames", 100000)
    assert_clean_failure(result, Exit.USAGE, "at most 819 frames")


@needs_assets
def test_question_that_is_not_utf8(cli, tiny_model, video, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("\udcff\udcfe?\n"))  # bytes 0xff 0xfe read from a pipe
    assert_clean_failure(cli("ask", video, "-", "-m", tiny_model), Exit.USAGE, "UTF-8")


@pytest.mark.parametrize("source", ["/dev/zero", "big"])
def test_prompt_file_longer_than_1_mb(cli, video, tmp_path, source):
    path = tmp_path / "big.txt" if source == "big" else source
    if source == "big":
        path.write_text("why " * 300_000)  # 1.2 MB
    assert_clean_failure(cli("ask", video, "--prompt-file", path), Exit.USAGE, "1 MB")


def test_question_longer_than_1_mb_from_stdin(cli, video, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("why " * 300_000))
    assert_clean_failure(cli("ask", video, "-"), Exit.USAGE, "1 MB")


@pytest.mark.parametrize(
    "option, value",
    [("--seed", "1180591620717411303424"), ("--seed", "-1"), ("--temperature", "nan"), ("--temperature", "inf"),
     ("--top-p", "nan"), ("--max-new-tokens", "nan")],
)
def test_out_of_range_settings(cli, video, option, value):
    assert_clean_failure(cli("ask", video, QUESTION, option, value), Exit.USAGE, option)


@needs_assets
@pytest.mark.parametrize("config", ["{not json", '{"model_type": "video_llava", "text_config": "oops"}', "[1, 2]"])
def test_config_json_that_cannot_be_read(cli, video, tiny_model, tmp_path, config):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text(config)
    assert_clean_failure(cli("ask", video, QUESTION, "-m", broken), Exit.MODEL, "config.json")


def test_malformed_field_of_a_real_config(cli, video, tiny_model, tmp_path):
    import json

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"] = "oops"
    (broken / "config.json").write_text(json.dumps(config))
    assert_clean_failure(cli("ask", video, QUESTION, "-m", broken), Exit.MODEL, "config.json", "text_config")


@pytest.mark.parametrize("how", ["--debug", "VIDEOQA_DEBUG"])
def test_debug_keeps_the_exit_code_and_shows_the_traceback(cli, tmp_path, monkeypatch, how):
    if how == "VIDEOQA_DEBUG":
        monkeypatch.setenv("VIDEOQA_DEBUG", "1")
    result = cli("ask", tmp_path / "nope.mp4", QUESTION, *(["--debug"] if how == "--debug" else []))
    assert result.code == Exit.INPUT and "Traceback" in result.err
    assert result.err.strip().splitlines()[-1].startswith("error: ") and "no such file" in result.err


def test_no_command_is_a_usage_error_and_help_is_not(cli):
    bare = cli()
    assert bare.code == Exit.USAGE and bare.out == "" and bare.err.startswith("error: missing command")
    assert len(bare.err.strip().splitlines()) == 1
    helped = cli("--help")
    assert helped.code == 0 and "Usage" in helped.out and helped.err == ""


@needs_assets
def test_weights_missing_from_the_checkpoint(cli, video, tiny_model, tmp_path):
    """transformers would fill a missing weight with random numbers and answer nonsense; it is a model error."""
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial)
    weights = load_file(partial / "model.safetensors")
    dropped = next(k for k in weights if k.endswith("class_embedding"))
    save_file({k: v for k, v in weights.items() if k != dropped}, partial / "model.safetensors", metadata={"format": "pt"})
    assert_clean_failure(cli("ask", video, QUESTION, "-m", partial), Exit.MODEL, "lacks", "class_embedding")


@needs_assets
@pytest.mark.parametrize("header", [
    b'{"extra": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 4]}}',  # a shape that is no list of numbers
    b'{"extra": [1, 2]}',
    b"not json at all",
])
def test_a_safetensors_header_that_cannot_be_read(cli, video, tiny_model, tmp_path, header):
    """The memory check reads every header before loading: a bad one is a model error there, as at loading."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "extra.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    assert_clean_failure(cli("ask", video, QUESTION, "-m", bad), Exit.MODEL, "extra.safetensors", "corrupt")


@needs_assets
@pytest.mark.parametrize("field, value, words", [
    ("vision_feature_layer", -100, ["vision_feature_layer -100"]),  # the tiny tower has 2 layers
    ("vision_feature_layer", 3, ["vision_feature_layer 3"]),
    ("max_position_embeddings", -1, ["max_position_embeddings"]),
])
def test_a_config_field_out_of_range(cli, video, tiny_model, tmp_path, field, value, words):
    import json

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    (config["text_config"] if field == "max_position_embeddings" else config)[field] = value
    (broken / "config.json").write_text(json.dumps(config))
    assert_clean_failure(cli("ask", video, QUESTION, "-m", broken), Exit.MODEL, "config.json", *words)
