"""Shared fixtures: tiny random Video-LLaVA checkpoints built offline, real assets from ../shared."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
needs_assets = pytest.mark.skipif(not ASSETS.is_dir(), reason="../shared/assets is not beside the checkout")


def asset(relative: str) -> Path:
    return ASSETS / relative


def build_tokenizer(directory: Path):
    """The real Llama-2 tokenizer plus the three tokens Video-LLaVA adds (ids 32000-32002)."""
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(asset("tokenizer/llama2c_tokenizer.model"), directory / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(directory)
    tokenizer.add_tokens(["<image>", "<video>", "<pad>"], special_tokens=True)
    tokenizer.pad_token = "<pad>"
    return tokenizer


def build_video_llava(directory: Path, image_size: int = 28, context: int = 4096, seed: int = 0) -> Path:
    """A random-weight Video-LLaVA with the real tokenizer; 28 px / 14 px patches = 5 tokens per frame."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    tokenizer = build_tokenizer(directory)
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
        bos_token_id=1, eos_token_id=2, pad_token_id=32002,
    )
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_seq_length=(image_size // 14) ** 2,
                              video_seq_length=8 * ((image_size // 14) ** 2 + 1))
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    if not ASSETS.is_dir():
        pytest.skip("../shared/assets (the real tokenizer) is not beside the checkout")
    return build_video_llava(tmp_path_factory.mktemp("tiny-video-llava"))


@pytest.fixture(autouse=True)
def user_dirs(tmp_path, monkeypatch):
    """Each test gets its own empty data dir (chat history) and cache dir (video features)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[:200]!r}, err={self.err[:300]!r})"


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


def reference_net(model_dir: Path):
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration

    return VideoLlavaForConditionalGeneration.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def reference_pixels(net, images):
    """transformers' CLIPImageProcessorPil at the tower's size."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = net.config.vision_config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images, return_tensors="pt").pixel_values


def reference_prompt(net, tokenizer, frames, question: str) -> list[int]:
    """The processor's way: the placeholder repeated in the text before tokenising, BOS first."""
    patches = (net.config.vision_config.image_size // net.config.vision_config.patch_size) ** 2
    text = "USER: " + "<video>" * len(frames.indices) * (patches + 1) + f"\n{question} ASSISTANT:"
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
