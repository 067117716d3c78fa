"""Qwen2.5-VL (`qwen2_5_vl`): a ViT with window attention (full attention in `fullatt_block_indexes`), 14 px
patches, two frames to a temporal patch, 2 x 2 patches merged into one token; dynamic resolution; M-RoPE whose time
axis follows absolute time (`tokens_per_second` x the seconds a temporal patch spans). ChatML with the checkpoint's
default system turn (its chat_template.json); `<|vision_start|><|video_pad|><|vision_end|>`, the pad repeated once
per merged token, as `Qwen2_5_VLProcessor` expands it."""

from __future__ import annotations

import functools

import numpy as np

import videoqa.families.qwen as qwen
from videoqa.families.base import Family, Videos
from videoqa.pixels import qwen_video_pixels

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # the template's, when none is given
# Qwen2VLVideoProcessor's defaults, under what the video settings give (the hub checkpoints have no
# video_preprocessor_config.json: their videos take preprocessor_config.json's bounds); images take qwen.IMAGE
VIDEO = {**qwen.IMAGE, "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}}
FPS = 2.0  # the processor's sampling rate, and what a one-frame video's temporal patch is timed at
MIN_FRAMES, MAX_FRAMES = 4, 768  # Qwen2VLVideoProcessor's min_frames, max_frames

image_bounds = functools.partial(qwen.bounds, kind="image", defaults=qwen.IMAGE)
video_bounds = functools.partial(qwen.bounds, kind="video", defaults=VIDEO)


def video_pixels(config, frames: np.ndarray):
    return qwen_video_pixels(frames, **video_bounds(config))


def video_positions(config, frames: int, size: tuple[int, int] | None = None) -> int:
    patches, tokens = qwen.video_tokens(config, video_bounds, frames, size, clip_budget=False)
    return patches * tokens


def positions(net, ids, padding, past, visuals):
    return qwen.rope_positions(net, ids, padding, past, visuals, temporal=net.config.vision_config.temporal_patch_size,
                               default_fps=FPS)


FAMILY = Family(
    "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
    functools.partial(qwen.image_features, bounds_of=image_bounds),
    lambda config: qwen.largest_image(config, image_bounds),
    template=SYSTEM + qwen.TURN, followup=qwen.FOLLOWUP, **qwen.MEDIA,
    video=Videos(video_pixels, qwen.video_features, video_positions, least=MIN_FRAMES),
    video_token="<|video_pad|>", image_token="<|image_pad|>", vision_modules=("model.visual",),
    generation={"fps": FPS, "max_frames": MAX_FRAMES}, positions=positions, tower_tokens=qwen.tower_tokens,
)
