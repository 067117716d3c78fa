"""What every model family is made of: the `Family` and `Videos` records, the 1-D positions of the LLaVA line, the
prompt texts and frame preprocessing more than one family shares. The families themselves are the modules beside
this one; the registry is the package (`videoqa.families`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from videoqa import features, pixels
from videoqa.decode import LanguageModel, Positions
from videoqa.features import Visual

VICUNA = "USER: {media}\n{question} ASSISTANT:"  # llava_v1, as the HF ports render it; {media} is the placeholder
VICUNA_FOLLOWUP = "USER: {question} ASSISTANT:"  # later turns: `... ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`
# a later turn that brings media: `... ASSISTANT: {a1}</s>USER: <video>\n{q2} ASSISTANT:` (the docs' mixed media)
VICUNA_FOLLOWUP_MEDIA = VICUNA
DESCRIBE = "Describe what happens in this part of the video."  # a timeline's question for each segment
FIND = "Does this part of the video show: {query}? Answer yes or no."  # find's question; the answer's first token


def text_positions(ids: torch.Tensor, padding: torch.Tensor | None, past: int) -> Positions:
    """1-D positions (the LLaVA families): (B, T) `ids` after `past` tokens in the cache count on from `past`,
    left padding left out of the count (as `generate` counts with its attention mask)."""
    batch, length = ids.shape
    if padding is None:
        prompt = torch.arange(past, past + length, device=ids.device).expand(batch, -1)
        return Positions(prompt, torch.full((batch, 1), past + length, device=ids.device))
    return Positions((padding.cumsum(-1) - 1).clamp(min=0) + past, padding.sum(-1, keepdim=True) + past)


def joined(separator: str) -> Callable[[list[tuple[bool, str]]], str]:
    """What stands for `{media}` in a turn: its media's placeholders (or texts), in prompt order, `separator`
    between them (the LLaVA templates' `<image>\\n<video>`; each item is (is a video, placeholder or text))."""
    return lambda media: separator.join(text for _, text in media)


def repeated(tokenizer, placeholder: str, visual: Visual) -> list[int]:
    """The placeholder's id once per feature row: what the LLaVA processors expand `<video>` and `<image>` to."""
    return [tokenizer.convert_tokens_to_ids(placeholder)] * visual.rows.shape[0]


def clip_frames(config, frames):
    return pixels.clip_pixels(frames, config.vision_config.image_size)


def siglip_frames(config, frames):
    return pixels.siglip_pixels(frames, config.vision_config.image_size)


@dataclass(frozen=True)
class Videos:
    """How a family answers about videos: frames to pixels, pixels to rows, and the rows' count in advance."""

    pixels: Callable[[Any, Any], Any]  # (config, (N, H, W, 3) uint8 frames) -> what `features` takes
    features: Callable[[Any, Any], Any]  # (net, pixels) -> (positions, D) rows, or a features.Visual
    # (config, frames, frame (height, width) or None for the family's reference size) -> the prompt positions the
    # video takes, known before anything is decoded (a frame's tokens follow its size under dynamic resolution)
    positions: Callable[..., int]
    least: int = 1  # the fewest frames --fps samples (the processor's minimum)

    def max_frames(self, config, context: int, size: tuple[int, int] | None = None) -> int:
        """The most frames whose video alone leaves a position free in `context` (a bisection: positions grow with
        the frames, not always in equal steps)."""
        low, high = 0, 1
        while self.positions(config, high, size) < context:
            low, high = high, high * 2
        while high - low > 1:  # positions(low) < context <= positions(high)
            middle = (low + high) // 2
            low, high = (middle, high) if self.positions(config, middle, size) < context else (low, middle)
        return low


@dataclass(frozen=True)
class Family:
    name: str  # config.json's model_type
    model_class: str  # the transformers class that loads it
    image_features: Callable[[Any, Any], Any]  # (net, PIL image) -> (positions, D)
    # (config) -> (tower tiles, positions) of the largest image, for the memory estimate; by default one tile
    largest_image: Callable[[Any], tuple[int, int]] = features.single_image_bound
    template: str = VICUNA  # the first turn; {media} is the placeholder, {question} the question
    followup: str = VICUNA_FOLLOWUP  # later turns, after the previous answer and its EOS, tokenised without BOS
    followup_media: str = VICUNA_FOLLOWUP_MEDIA  # a later turn that brings media ({media}: as `media_text` has it)
    # a turn's images before its videos, as the LLaVA chat templates render them (False: in the order given)
    images_first: bool = True
    media_text: Callable[[list[tuple[bool, str]]], str] = joined("\n")
    describe: str = DESCRIBE  # what a timeline asks of each segment by default
    video: Videos | None = None  # None: the family answers about still images only
    video_token: str = "<video>"
    image_token: str = "<image>"
    vision_modules: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector")
    frames: int = 8  # frames sampled by default (the model cards' examples)
    generation: dict[str, Any] = field(default_factory=dict)  # setting defaults over the built-in ones
    language_model: Callable[[Any], LanguageModel] = field(default=lambda net: LanguageModel(
        net.get_input_embeddings(), net.model.language_model, net.lm_head))  # what decodes, in the loaded class
    # (net, the whole rows' ids (B, T), left padding (B, T) or None, tokens already in the cache, each row's Visual)
    # -> where the tokens after the cached ones and the answer sit, and what else the body takes with the prefill;
    # 1-D by default (a media row, a position)
    positions: Callable[[Any, Any, Any, int, Any], Positions] = (
        lambda net, ids, padding, past, visuals: text_positions(ids[:, past:], padding, past))
    # (config, positions a tower tile's rows take) -> the tokens the tower runs on for it (the memory estimate)
    tower_tokens: Callable[[Any, int], int] = (
        lambda config, per_tile: (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1)
    # (tokenizer, placeholder, Visual) -> the ids that stand for the media in the prompt, one per row it takes, or
    # the media's text (tokenised with the template around it)
    expand: Callable[[Any, str, Visual], list[int] | str] = repeated
