"""Shared fixtures: tiny random Video-LLaVA and LLaVA-NeXT(-Video) checkpoints built offline, real assets from
../shared."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
needs_assets = pytest.mark.skipif(not ASSETS.is_dir(), reason="../shared/assets is not beside the checkout")


def asset(relative: str) -> Path:
    return ASSETS / relative


def build_tokenizer(directory: Path, added: tuple[str, ...] = ("<image>", "<video>", "<pad>"), pad: str = "<pad>"):
    """The real Llama-2 tokenizer plus a family's added tokens, in its order (Video-LLaVA: ids 32000-32002)."""
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(asset("tokenizer/llama2c_tokenizer.model"), directory / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(directory)
    tokenizer.add_tokens(list(added), special_tokens=True)
    tokenizer.pad_token = pad
    tokenizer.add_bos_token = True  # as the checkpoints' tokenizers: transformers' processors get BOS from it
    return tokenizer


def tiny_vision(image_size: int):
    """A 2-layer CLIP tower with 14 px patches, as in the real checkpoints."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
    )


def tiny_text(context: int, pad_token_id: int, **extra):
    """A 2-layer Llama with the real vocabulary size plus the padding rows of the llava-hf ports."""
    from transformers import LlamaConfig

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return LlamaConfig(vocab_size=32064, max_position_embeddings=context, bos_token_id=1, eos_token_id=2,
                       pad_token_id=pad_token_id, **{**dims, **extra})


def save_tiny(directory: Path, model_class, config, tokenizer, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model_class(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_video_llava(
    directory: Path, image_size: int = 28, context: int = 4096, seed: int = 0, initializer_range: float = 0.02,
    text: dict | None = None,
) -> Path:
    """A random-weight Video-LLaVA with the real tokenizer; 28 px / 14 px patches = 5 tokens per frame.
    A larger `initializer_range` makes each answer depend visibly on everything before it; `text` overrides the
    language model's dimensions."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    tokenizer = build_tokenizer(directory)
    patches = (image_size // 14) ** 2
    text = tiny_text(context, 32002, initializer_range=initializer_range, **(text or {}))
    config = VideoLlavaConfig(vision_config=tiny_vision(image_size), text_config=text,
                              image_seq_length=patches, video_seq_length=8 * (patches + 1))
    return save_tiny(directory, VideoLlavaForConditionalGeneration, config, tokenizer, seed)


def build_llava_next_video(directory: Path, seed: int = 0) -> Path:
    """A random-weight LLaVA-NeXT-Video shaped like the 7B where it counts: a 336 px tower (24 x 24 patches, 144
    pooled tokens per frame), <video> = 32000 and <image> = 32001, and a 4096-token context stretched x2 by linear
    RoPE scaling. Weights larger than the default init make the answer depend visibly on the frames."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    tokenizer = build_tokenizer(directory, ("<video>", "<image>"), pad="<unk>")
    text = tiny_text(4096, 0, rope_scaling={"type": "linear", "factor": 2.0}, initializer_range=0.3)
    config = LlavaNextVideoConfig(vision_config=tiny_vision(336), text_config=text, video_token_index=32000,
                                  image_token_index=32001)
    return save_tiny(directory, LlavaNextVideoForConditionalGeneration, config, tokenizer, seed)


def build_llava_next(directory: Path, seed: int = 0) -> Path:
    """A random-weight LLaVA-NeXT (images only) with llava-v1.6-vicuna's tokens: <image> = 32000, <pad> = 32001."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = build_tokenizer(directory, ("<image>", "<pad>"))
    config = LlavaNextConfig(vision_config=tiny_vision(336), text_config=tiny_text(4096, 32001, initializer_range=0.3),
                             image_token_index=32000)
    return save_tiny(directory, LlavaNextForConditionalGeneration, config, tokenizer, seed)


def tiny(tmp_path_factory, build) -> Path:
    if not ASSETS.is_dir():
        pytest.skip("../shared/assets (the real tokenizer) is not beside the checkout")
    return build(tmp_path_factory.mktemp(build.__name__.removeprefix("build_")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny(tmp_path_factory, build_video_llava)


@pytest.fixture(scope="session")
def tiny_next_video(tmp_path_factory) -> Path:
    return tiny(tmp_path_factory, build_llava_next_video)


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory) -> Path:
    return tiny(tmp_path_factory, build_llava_next)


@pytest.fixture(autouse=True)
def user_dirs(tmp_path, monkeypatch):
    """Each test gets its own empty data dir (chat history) and cache dir (video features)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def float32_on_cpu(monkeypatch):
    """In-process runs compare with transformers in float32: `--dtype auto` is told the CPU has no native bfloat16
    (the probe itself, and auto's bfloat16 pick, are tested on their own). Real processes keep the real probe."""
    from videoqa import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[:200]!r}, err={self.err[:300]!r})"


def assert_clean_failure(result: Result, code: int, *words: str) -> None:
    """One line on stderr naming the problem (every word in it), the exit code, nothing on stdout."""
    assert result.code == code, result
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    assert "Traceback" not in result.err


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `videoqa ARGS...` in-process through the real entry point (error handling included)."""
    import sys

    from videoqa.cli import main

    def run(*args) -> Result:
        monkeypatch.setattr(sys, "argv", ["videoqa", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return Result(int(code), out, err)

    return run


@pytest.fixture
def chat(cli, monkeypatch):
    """`videoqa chat ARGS` with `lines` piped to stdin."""
    import io
    import sys

    def run(lines, *args):
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
        return cli("chat", *args)

    return run


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    """The tiny Video-LLaVA checkpoint loaded once, in float32 on the CPU, without the feature cache."""
    import videoqa

    return videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)


def reference_net(model_dir: Path):
    """transformers' own class for the checkpoint's architecture, and its tokenizer."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def reference_pixels(net, images):
    """transformers' CLIPImageProcessorPil at the tower's size."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = net.config.vision_config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images, return_tensors="pt").pixel_values


def reference_prompt(net, tokenizer, frames, question: str) -> list[int]:
    """The processor's way: the placeholder repeated in the text before tokenising, BOS first."""
    patches = (net.config.vision_config.image_size // net.config.vision_config.patch_size) ** 2
    # As transformers' processors count them: Video-LLaVA keeps CLS, LLaVA-NeXT-Video pools 2x2.
    per_frame = patches // 4 if net.config.model_type == "llava_next_video" else patches + 1
    text = "USER: " + "<video>" * len(frames.indices) * per_frame + f"\n{question} ASSISTANT:"
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]


def reference_continue(net, ids: list[int], max_new_tokens: int, **pixels) -> list[int]:
    """transformers' greedy `generate` from a full token sequence."""
    import torch

    ids = torch.tensor([ids])
    out = net.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, **pixels
    )
    return out[0, ids.shape[1]:].tolist()


def reference_generate(model_dir: Path, frames, question: str, max_new_tokens: int) -> list[int]:
    """transformers' own answer: CLIPImageProcessorPil pixels, processor-style prompt, `generate`."""
    net, tokenizer = reference_net(model_dir)
    ids = reference_prompt(net, tokenizer, frames, question)
    return reference_continue(net, ids, max_new_tokens, pixel_values_videos=reference_pixels(net, list(frames.pixels))[None])


# LLaVA-NeXT's (vicuna_v1) first turn with an image, as its processor's chat template renders it; {q}: the question
NEXT_IMAGE_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                     "helpful, detailed, and polite answers to the human's questions. USER: <image>\n{q} ASSISTANT:")


def reference_next_image(model_dir: Path, image, text: str):
    """transformers' own LLaVA-NeXT inputs for an image: LlavaNextImageProcessorPil pixels and LlavaNextProcessor's
    placeholder count; (net, ids, the pixel inputs of `generate`).

    (LlavaNextVideoProcessor counts image placeholders with the same code but needs torchvision for videos.)"""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    net, tokenizer = reference_net(model_dir)
    size = net.config.vision_config.image_size
    pixels = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                        image_grid_pinpoints=net.config.image_grid_pinpoints)
    processor = LlavaNextProcessor(pixels, tokenizer, patch_size=net.config.vision_config.patch_size,
                                   vision_feature_select_strategy=net.config.vision_feature_select_strategy,
                                   num_additional_image_tokens=1)
    inputs = processor(images=image, text=text, return_tensors="pt")
    return net, inputs.input_ids[0].tolist(), {"pixel_values": inputs.pixel_values, "image_sizes": inputs.image_sizes}


def reference_logprob(net, ids: list[int], option: list[int], **inputs) -> float:
    """transformers' model forward on prompt + option: the summed log-probability of the option's tokens, float32."""
    import torch

    row = torch.tensor([ids + option])
    with torch.no_grad():
        logits = net(input_ids=row, attention_mask=torch.ones_like(row), **inputs).logits[0].float()
    scores = logits.log_softmax(-1)
    return sum(float(scores[len(ids) - 1 + i, token]) for i, token in enumerate(option))


def reference_torchao(path: Path, quantize: str, skip: list[str], group: int, dtype=None):
    """transformers' own class loaded through TorchAoConfig (int8: Int8WeightOnlyConfig; int4:
    PrototypeInt4WeightOnlyConfig in groups of `group`), the modules in `skip` unquantized, in `dtype` (bfloat16 by
    default); an LM head tied to the embeddings is quantized as a copy of its own with the same config, by torchao's
    own `quantize_` (the load leaves a tied head as it is)."""
    import torch
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForImageTextToText, TorchAoConfig

    dtype = dtype or torch.bfloat16
    config = Int8WeightOnlyConfig() if quantize == "int8" else PrototypeInt4WeightOnlyConfig(group_size=group)
    net = AutoModelForImageTextToText.from_pretrained(
        path, quantization_config=TorchAoConfig(config, modules_to_not_convert=skip), device_map="cpu",
        dtype=dtype).eval()
    if net.lm_head.weight is net.get_input_embeddings().weight:
        head = torch.nn.Linear(net.lm_head.in_features, net.lm_head.out_features, bias=False, dtype=dtype)
        head.weight = torch.nn.Parameter(net.lm_head.weight.detach().clone(), requires_grad=False)
        quantize_(head, config)
        net.lm_head = head
    return net


def run_videoqa(*args, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """`python -m videoqa ARGS` as a real process: streams, signals and locales as a shell gives them."""
    command = [sys.executable, "-m", "videoqa", *map(str, args)]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300, **popen)


@pytest.fixture
def counted(monkeypatch):
    """Frame decodes and vision-tower runs, counted: `videoqa.frames.read_frames` wrapped, and each video family
    registered again (the public registration point) with its video features function wrapped. `towers` lists the
    frame count of each tower run."""
    import dataclasses

    import videoqa
    from videoqa import families, frames

    calls = {"frames": 0, "towers": []}
    real_read = frames.read_frames

    def read_frames(*args, **kwargs):
        calls["frames"] += 1
        return real_read(*args, **kwargs)

    def counting(real):
        def video_features(net, pixels):
            calls["towers"].append(pixels.shape[0])
            return real(net, pixels)

        return video_features

    monkeypatch.setattr(frames, "read_frames", read_frames)
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))  # put back after the test
    for family in list(families.FAMILIES.values()):
        if family.video:
            video = dataclasses.replace(family.video, features=counting(family.video.features))
            videoqa.register(dataclasses.replace(family, video=video))
    return calls


def reference_traced(net, ids: list[int], max_new_tokens: int, **inputs):
    """transformers' greedy `generate` with every per-step output: scores, hidden states and attention weights
    (the language model on eager attention for it, which alone computes them; then back)."""
    import torch

    before = net.config.text_config._attn_implementation
    net.set_attn_implementation({"text_config": "eager"})
    row = torch.tensor([ids])
    try:
        return net.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=max_new_tokens,
                            do_sample=False, return_dict_in_generate=True, output_scores=True,
                            output_hidden_states=True, output_attentions=True, **inputs)
    finally:
        net.set_attn_implementation({"text_config": before})


def check_logprobs(entries: list[dict], tokens: list[int], scores: list, top: int) -> None:
    """Record entries of --logprobs `top` against transformers' per-step (V,) scores: each token's log-probability
    and its `top` likeliest alternatives within 1e-4 of the scores' log-softmax."""
    assert len(entries) == len(tokens) == len(scores)
    for entry, token, logits in zip(entries, tokens, scores):
        reference = logits.float().log_softmax(-1)
        assert entry["token"] == token and abs(entry["logprob"] - float(reference[token])) < 1e-4
        best = reference.topk(top)
        assert [e["token"] for e in entry["top"]] == best.indices.tolist()
        assert max(abs(e["logprob"] - float(v)) for e, v in zip(entry["top"], best.values)) < 1e-4


def check_traced(answer, out, prompt_length: int, top: int) -> None:
    """An answer asked with logprobs=`top`, hidden_states=True, attentions=True against `reference_traced`'s
    output: the same tokens; each token's log-probability and its `top` alternatives within 1e-4 of the
    log-softmax of transformers' scores; hidden states and attention weights allclose (atol 1e-5, float32) to
    those of the position that chose each token."""
    import torch

    assert answer.tokens == out.sequences[0, prompt_length:].tolist()
    check_logprobs(answer.logprobs, answer.tokens, [scores[0] for scores in out.scores], top)
    for i in range(len(answer.tokens)):
        hidden = torch.stack([layer[0, -1] for layer in out.hidden_states[i]])
        assert torch.allclose(answer.hidden_states[i], hidden, atol=1e-5)
        weights = torch.stack([layer[0, :, -1] for layer in out.attentions[i]])
        assert answer.attentions[i].shape == weights.shape
        assert torch.allclose(answer.attentions[i], weights, atol=1e-5)
