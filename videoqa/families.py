"""Model families: everything that differs between Video-LLaVA, LLaVA-NeXT-Video, LLaVA-NeXT, LLaVA-OneVision and
LLaVA-1.5, in one object each, keyed by config.json's `model_type`.

A family says which transformers class loads it, how frames and images become pixels and pixels become the
rows spliced over its placeholder, how many positions a video takes (known from the config before anything is
decoded), where a prompt's tokens sit for the rotary embedding (the decode loop computes no positions), its prompt
format and placeholder tokens, and which modules are the vision side (kept in the compute
dtype when the language model is quantized). Adding a family is one `register(Family(...))`; a `model_type`
that no family claims is an error everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from videoqa import features, pixels
import torch

from videoqa.decode import LanguageModel, Positions
from videoqa.errors import Exit, VideoQAError
from videoqa.features import patches_per_side, pooled_side

VICUNA = "USER: {media}\n{question} ASSISTANT:"  # llava_v1, as the HF ports render it; {media} is the placeholder
VICUNA_FOLLOWUP = "USER: {question} ASSISTANT:"  # later turns: `... ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`
DESCRIBE = "Describe what happens in this part of the video."  # a timeline's question for each segment
FIND = "Does this part of the video show: {query}? Answer yes or no."  # find's question; the answer's first token
# Qwen2's ChatML as the llava-hf OneVision checkpoints' chat_template.json renders it: a space after the role, the
# media and then "\n" + the text, `<|im_end|>` with no newline after it; no system turn, no BOS.
ONEVISION = "<|im_start|>user {media}\n{question}<|im_end|><|im_start|>assistant\n"
ONEVISION_FOLLOWUP = "<|im_start|>user \n{question}<|im_end|><|im_start|>assistant\n"  # after `{a1}<|im_end|>`


def text_positions(ids: torch.Tensor, padding: torch.Tensor | None, past: int) -> Positions:
    """1-D positions (the LLaVA families): (B, T) `ids` after `past` tokens in the cache count on from `past`,
    left padding left out of the count (as `generate` counts with its attention mask)."""
    batch, length = ids.shape
    if padding is None:
        prompt = torch.arange(past, past + length, device=ids.device).expand(batch, -1)
        return Positions(prompt, torch.full((batch, 1), past + length, device=ids.device))
    return Positions((padding.cumsum(-1) - 1).clamp(min=0) + past, padding.sum(-1, keepdim=True) + past)


@dataclass(frozen=True)
class Videos:
    """How a family answers about videos: frames to pixels, pixels to rows, and the rows' count in advance."""

    pixels: Callable[[Any, Any], Any]  # (config, (N, H, W, 3) uint8 frames) -> (N, 3, S, S) float32
    features: Callable[[Any, Any], Any]  # (net, pixels) -> (positions, D)
    positions: Callable[[Any, int], int]  # (config, frames) -> positions, known before anything is decoded

    def max_frames(self, config, context: int) -> int:
        """The most frames whose video alone leaves a position free in `context`."""
        empty, one = self.positions(config, 0), self.positions(config, 1)
        return (context - 1 - empty) // (one - empty)


@dataclass(frozen=True)
class Family:
    name: str  # config.json's model_type
    model_class: str  # the transformers class that loads it
    image_features: Callable[[Any, Any], Any]  # (net, PIL image) -> (positions, D)
    # (config) -> (tower tiles, positions) of the largest image, for the memory estimate; by default one tile
    largest_image: Callable[[Any], tuple[int, int]] = features.single_image_bound
    template: str = VICUNA  # the first turn; {media} is the placeholder, {question} the question
    followup: str = VICUNA_FOLLOWUP  # later turns, after the previous answer and its EOS, tokenised without BOS
    describe: str = DESCRIBE  # what a timeline asks of each segment by default
    video: Videos | None = None  # None: the family answers about still images only
    video_token: str = "<video>"
    image_token: str = "<image>"
    vision_modules: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector")
    frames: int = 8  # frames sampled by default (the model cards' examples)
    generation: dict[str, Any] = field(default_factory=dict)  # setting defaults over the built-in ones
    language_model: Callable[[Any], LanguageModel] = field(default=lambda net: LanguageModel(
        net.get_input_embeddings(), net.model.language_model, net.lm_head))  # what decodes, in the loaded class
    # (ids (B, T), left padding (B, T) or None, tokens already in the cache) -> where the prompt and answer sit
    positions: Callable[[Any, Any, int], Positions] = text_positions


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


def clip_frames(config, frames):
    return pixels.clip_pixels(frames, config.vision_config.image_size)


def siglip_frames(config, frames):
    return pixels.siglip_pixels(frames, config.vision_config.image_size)


register(Family(  # all 257 tokens of a frame (CLS kept); images through their own tower
    "video_llava", "VideoLlavaForConditionalGeneration", features.video_llava_image, features.single_image_bound,
    video=Videos(clip_frames, features.video_llava_video, lambda config, n: n * (patches_per_side(config) ** 2 + 1)),
    vision_modules=("model.video_tower", "model.image_tower", "model.multi_modal_projector"),
))
register(Family(  # frames 2x2-pooled (144 tokens at 336 px); AnyRes images
    "llava_next_video", "LlavaNextVideoForConditionalGeneration", features.anyres_image, features.anyres_image_bound,
    video=Videos(clip_frames, features.pooled_video,
                 lambda config, n: n * (patches_per_side(config) // config.spatial_pool_stride) ** 2),
    vision_modules=("model.vision_tower", "model.vision_resampler", "model.multi_modal_projector", "model.image_newline"),
))
register(Family(  # still images only, AnyRes
    "llava_next", "LlavaNextForConditionalGeneration", features.anyres_image, features.anyres_image_bound,
    # vicuna_v1 with its system line, the format transformers' LLaVA-NeXT docs give for llava-v1.6-vicuna-7b-hf
    template="A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. " + VICUNA,
    vision_modules=("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
))
register(Family(  # frames 2x2 bilinear-pooled after the projector (196 tokens at 384 px), one newline after the
    # whole video; AnyRes-max-9 images
    "llava_onevision", "LlavaOnevisionForConditionalGeneration", features.anyres_max_image,
    features.anyres_max_image_bound,
    template=ONEVISION, followup=ONEVISION_FOLLOWUP,
    video=Videos(siglip_frames, features.onevision_video, lambda config, n: n * pooled_side(config) ** 2 + 1),
    vision_modules=("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
))
register(Family(  # LLaVA-1.5: still images only, one 336 px CLIP crop, CLS dropped (576 tokens)
    "llava", "LlavaForConditionalGeneration", features.llava_image, features.single_image_bound,
    vision_modules=("model.vision_tower", "model.multi_modal_projector"),
))
