"""LLaVA-NeXT (`llava_next`, LLaVA-1.6): still images only, through AnyRes."""

from __future__ import annotations

from videoqa.families.base import VICUNA, Family
from videoqa.features import anyres_image, anyres_image_bound

FAMILY = Family(
    "llava_next", "LlavaNextForConditionalGeneration", anyres_image, anyres_image_bound,
    # vicuna_v1 with its system line, the format transformers' LLaVA-NeXT docs give for llava-v1.6-vicuna-7b-hf
    template="A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. " + VICUNA,
    vision_modules=("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
)
