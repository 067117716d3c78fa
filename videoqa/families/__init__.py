"""Model families: everything that differs between Video-LLaVA, LLaVA-NeXT-Video, LLaVA-NeXT, LLaVA-OneVision,
LLaVA-1.5, Qwen2.5-VL, Qwen3-VL and SmolVLM2, one module each, registered here by config.json's `model_type`.

A family says which transformers class loads it, how frames and images become pixels and pixels become the
rows spliced over its placeholder, how many positions a video takes (known from the config before anything is
decoded), where a prompt's tokens sit for the rotary embedding (the decode loop computes no positions), its prompt
format and placeholder tokens, and which modules are the vision side (kept in the compute dtype when the language
model is quantized). What families share is in `base.py` and in the stages (pixels.py, features.py). Adding a
family is one module with its `FAMILY` and one line below, or `register(Family(...))` from outside; a
`model_type` that no family claims is an error everywhere.
"""

from __future__ import annotations

from videoqa.errors import Exit, VideoQAError
from videoqa.families import (llava, llava_next, llava_next_video, llava_onevision, qwen2_5_vl, qwen3_vl,
                              smolvlm, video_llava)
from videoqa.families.base import DESCRIBE, FIND, Family, Videos, text_positions

__all__ = ["DESCRIBE", "FIND", "FAMILIES", "Family", "Videos", "family", "register", "text_positions"]

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make a family known by its `model_type` (replacing one of the same name)."""
    FAMILIES[family.name] = family
    return family


def family(model_type: str, where: str = "") -> Family:
    if model_type not in FAMILIES:
        raise VideoQAError(
            f"{where}unsupported architecture {model_type!r}; supported: {', '.join(FAMILIES)}", Exit.MODEL
        )
    return FAMILIES[model_type]


# the order `supported:` lists
for module in (video_llava, llava_next_video, llava_next, llava_onevision, llava, qwen2_5_vl, qwen3_vl,
               smolvlm):
    register(module.FAMILY)
