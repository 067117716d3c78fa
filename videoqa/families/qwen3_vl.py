"""Qwen3-VL (`qwen3_vl`): a ViT of 16 px patches, two frames to a temporal patch, 2 x 2 patches merged into one
token, and DeepStack: the merged rows of some tower blocks (`deepstack_visual_indexes`) added to the hidden states of
the first decoder layers at the visual positions. Dynamic resolution; a video's pixel bounds hold for the whole clip
(`Qwen3VLVideoProcessor`), an image's for the image (`Qwen2VLImageProcessor`, as Qwen2.5-VL's). Interleaved M-RoPE
that places each temporal patch as an image where its tokens start: the time is in the text instead, a `<t seconds>`
before each patch, as `Qwen3VLProcessor` writes it. ChatML without a default system turn (the hub's
chat_template.json).

A video's `<|video_pad|>`, inside the template's own `<|vision_start|>...<|vision_end|>`, becomes for each temporal
patch `<{t:.1f} seconds><|vision_start|>` + one pad per merged token + `<|vision_end|>`, t the mean time of the
patch's first and last frame (an odd frame count padded with the last frame); an image's pad is repeated once per
merged token.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

import videoqa.families.qwen as qwen
from videoqa.families.base import Family, Videos, repeated
from videoqa.features import Visual
from videoqa.pixels import qwen_video_pixels
from videoqa.prompt import text_ids

# Qwen3VLVideoProcessor's defaults, under what the checkpoint's video_preprocessor_config.json gives (in `size`
# form: a file's `size` replaces it whole, as transformers reads it); images take Qwen2VLImageProcessor's (qwen.IMAGE)
VIDEO = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
         "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
         "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}
FPS = 2.0  # Qwen3VLVideoProcessor's sampling rate
MIN_FRAMES, MAX_FRAMES = 4, 768  # its min_frames, max_frames
# `<t seconds>`'s tokens under the hub tokenizer, whose pre-tokenizer splits digits one by one: "<", up to four
# digits (under 10,000 s), ".", one digit, " seconds", ">": an upper bound, the time being unknown in advance
TIMESTAMP_TOKENS = 9

image_bounds = functools.partial(qwen.bounds, kind="image", defaults=qwen.IMAGE)
video_bounds = functools.partial(qwen.bounds, kind="video", defaults=VIDEO)


def video_pixels(config, frames: np.ndarray):
    return qwen_video_pixels(frames, **video_bounds(config), clip_budget=True)


def video_positions(config, frames: int, size: tuple[int, int] | None = None) -> int:
    """Each temporal patch's timestamp (at most TIMESTAMP_TOKENS), vision start, merged tokens and vision end."""
    patches, tokens = qwen.video_tokens(config, video_bounds, frames, size, clip_budget=True)
    return patches * (TIMESTAMP_TOKENS + 1 + tokens + 1)


def patch_times(times: tuple[float, ...], temporal: int) -> list[float]:
    """The time `Qwen3VLProcessor._calculate_timestamps` gives each temporal patch of frames at `times`: the mean of
    its first and last frame's, the frames padded to whole patches with the last one."""
    padded = [*times, *[times[-1]] * (-len(times) % temporal)]
    return [(padded[i] + padded[i + temporal - 1]) / 2 for i in range(0, len(padded), temporal)]


def timestamp(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


def expand(tokenizer, placeholder: str, visual: Visual) -> list[int]:
    """The ids `Qwen3VLProcessor` puts for a video's pad (see the module doc), or for an image's. Each timestamp is
    tokenised alone: special tokens stand on both sides of it, and the tokenizer splits the text at them first."""
    if not visual.times:
        return repeated(tokenizer, placeholder, visual)
    patches = int(visual.grid[0, 0])
    pad, start, end = tokenizer.convert_tokens_to_ids([placeholder, "<|vision_start|>", "<|vision_end|>"])
    frame = [start, *[pad] * (visual.rows.shape[0] // patches), end]
    temporal = math.ceil(len(visual.times) / patches)  # the frames to a patch (the grid has t = ceil(frames / it))
    return [i for t in patch_times(visual.times, temporal) for i in [*text_ids(tokenizer, timestamp(t)), *frame]]


def deepstack(config, ids: torch.Tensor, past: int, visuals: list[Visual]) -> dict | None:
    """What the text model takes beside the embeddings when the tokens of the (B, T) rows `ids` after the `past`
    cached ones hold visual placeholders, as `Qwen3VLModel.forward` builds it: their (B, T - past) mask, and per
    DeepStack layer the rows of every visual in prompt order (row-major, as the mask selects them), those of the
    media before `past` left out (a later turn that brings media). None when they hold none."""
    mask = (ids == config.image_token_id) | (ids == config.video_token_id)
    skip, mask = int(mask[:, :past].sum()), mask[:, past:]
    if not mask.any():
        return None
    return {"visual_pos_masks": mask,
            "deepstack_visual_embeds": [torch.cat(layer)[skip:] for layer in zip(*(v.layers for v in visuals))]}


def positions(net, ids, padding, past, visuals):
    """M-RoPE over the whole rows (Qwen2.5-VL's way; Qwen3-VL's `get_rope_index` takes no seconds per patch), and
    DeepStack's inputs at the prefill that holds the media."""
    found = qwen.rope_positions(net, ids, padding, past, visuals,
                                temporal=net.config.vision_config.temporal_patch_size, default_fps=FPS)
    return found._replace(extras=deepstack(net.config, ids, past, visuals))


FAMILY = Family(
    "qwen3_vl", "Qwen3VLForConditionalGeneration", functools.partial(qwen.image_features, bounds_of=image_bounds),
    lambda config: qwen.largest_image(config, image_bounds),
    template=qwen.TURN, followup=qwen.FOLLOWUP, **qwen.MEDIA,  # no default system turn in its template
    video=Videos(video_pixels, qwen.video_features, video_positions, least=MIN_FRAMES),
    video_token="<|video_pad|>", image_token="<|image_pad|>", vision_modules=("model.visual",),
    generation={"fps": FPS, "max_frames": MAX_FRAMES}, positions=positions, tower_tokens=qwen.tower_tokens,
    expand=expand,
)
