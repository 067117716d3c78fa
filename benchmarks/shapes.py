"""Random-weight Video-LLaVA models of a chosen shape, built in memory, for benchmarks.

tiny: the test suite's model (28 px tower, 2-layer 64-wide Llama); small: a 224 px tower and an 8-layer
512-wide Llama; medium: the same tower and an 8-layer 2048-wide Llama; 7b: Llama-2-7B dimensions with a CLIP ViT-L/14 tower (GPU only: 14 GB in fp16).
The real Llama-2 tokenizer comes from ../shared/assets.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"

SHAPES = {
    "tiny": dict(
        vision=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    ),
    "small": dict(
        vision=dict(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4),
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
    ),
    "medium": dict(  # a 2048-wide language model: quantization's savings and costs show beside the embeddings
        vision=dict(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4),
        text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16),
    ),
    "7b": dict(
        vision=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    ),
}


def parser(doc: str):
    """The command line every benchmark shares: which model shape, on which device, in which dtype."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    return parser


def tokenizer():
    from transformers import LlamaTokenizer

    folder = Path(tempfile.mkdtemp())
    shutil.copy(ASSETS / "tokenizer" / "llama2c_tokenizer.model", folder / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(folder)
    tok.add_tokens(["<image>", "<video>", "<pad>"], special_tokens=True)
    tok.pad_token = "<pad>"
    return tok


def save(shape: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A random VideoLlavaForConditionalGeneration of `shape`, saved in `dtype` with the real tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    dims = SHAPES[shape]
    vision = CLIPVisionConfig(**dims["vision"])
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                       pad_token_id=32002, **dims["text"])
    config = VideoLlavaConfig(vision_config=vision, text_config=text)
    torch.manual_seed(0)
    VideoLlavaForConditionalGeneration(config).to(dtype).eval().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def build(shape: str, device: str, dtype: torch.dtype, **load):
    """A videoqa Model (the public API's) of a random checkpoint of `shape`, saved to a temporary folder and
    loaded as any checkpoint is."""
    import videoqa

    folder = save(shape, Path(tempfile.mkdtemp()), torch.float16 if shape == "7b" else torch.float32)
    return videoqa.load(folder, device=device, dtype=str(dtype).removeprefix("torch."), cache=False, **load)


def videos() -> list[Path]:
    return sorted((ASSETS / "videos").glob("*.mp4"))
