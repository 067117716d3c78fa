"""LLaVA-OneVision (`llava_onevision`): a SigLIP tower (384 px, no CLS). Frames through the tower's layer and the
projector, then 2x2 bilinear pooling (27 x 27 -> 14 x 14 = 196 per frame), one `image_newline` after the whole
video; images through AnyRes-max: the tiles packed as LLaVA-NeXT's, but a grid larger than `anyres_max_N` allows
(N base tiles' worth, with 10% slack) shrunk bilinearly before the `image_newline` of each row. Qwen2's ChatML."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from videoqa.families.base import Family, Videos, joined, siglip_frames
from videoqa.features import grid_of, largest_grid, patches, patches_per_side, with_newlines
from videoqa.pixels import anyres_max_pixels

# Qwen2's ChatML as the llava-hf OneVision checkpoints' chat_template.json renders it: a space after the role, the
# media (images first, then videos, nothing between them) and then "\n" + the text, `<|im_end|>` with no newline
# after it; no system turn, no BOS. A later turn with media is a first turn's text.
TEMPLATE = "<|im_start|>user {media}\n{question}<|im_end|><|im_start|>assistant\n"
FOLLOWUP = "<|im_start|>user \n{question}<|im_end|><|im_start|>assistant\n"  # after `{a1}<|im_end|>`


def pooled_side(config) -> int:
    """Patches along a frame's edge after the 2x2 bilinear pooling, rounded up as `apply_pooling` does: 27 -> 14."""
    return math.ceil(patches_per_side(config) / 2)


@torch.inference_mode()
def video_features(net, pixels: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) frames -> (N * pooled tokens + 1, D), frame-major, then `image_newline` once."""
    model = net.model
    projected = model.multi_modal_projector(patches(net, model.vision_tower, pixels))  # (N, side * side, D)
    pooled = bilinear_pool(net, projected)  # (N, ceil(side / 2)^2, D)
    return torch.cat([pooled.flatten(0, 1), model.image_newline[None].to(pooled.dtype)])


def bilinear_pool(net, features: torch.Tensor) -> torch.Tensor:
    """(N, side * side, D) -> (N, ceil(side / 2)^2, D): each frame's patch grid halved by bilinear interpolation,
    as OneVision's `apply_pooling` does (27 x 27 -> 14 x 14 at 384 px / 14 px)."""
    side, half = patches_per_side(net.config), pooled_side(net.config)
    grid = features.view(features.shape[0], side, side, -1).permute(0, 3, 1, 2)  # (N, D, side, side)
    grid = torch.nn.functional.interpolate(grid.contiguous(), size=[half, half], mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(features.shape[0], half * half, -1)


@torch.inference_mode()
def image_features(net, image: Image.Image) -> torch.Tensor:
    """A still image -> (positions, D) under AnyRes-max: base tile, then the (possibly shrunk) grid with a newline
    per row."""
    model, size = net.model, net.config.vision_config.image_size
    pixels = anyres_max_pixels(image, size, net.config.image_grid_pinpoints)  # (1 + tiles, 3, size, size)
    tiles = model.multi_modal_projector(patches(net, model.vision_tower, pixels))  # (1 + tiles, side * side, D)
    return pack_max(net, tiles, (image.height, image.width))


def pack_max(net, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """OneVision's `pack_image_features`: (1 + rows * cols, side * side, D) tiles of an image of `size` (h, w) ->
    (positions, D); as LLaVA-NeXT's packing, with the anyres_max downscale between the unpadding and the newlines."""
    grid = shrink(grid_of(net, tiles[1:], size), patches_per_side(net.config), net.config.vision_aspect_ratio)
    return with_newlines(net, tiles[0], grid)


def shrink(grid: torch.Tensor, side: int, aspect_ratio: str) -> torch.Tensor:
    """(D, H, W) -> the grid scaled down bilinearly to about `max_tiles` tiles' worth of features when it holds more
    than 1.1^2 times that ("anyres_max_9": 9 tiles of side x side), keeping its aspect ratio."""
    max_tiles = int(aspect_ratio.removeprefix("anyres_max_"))
    height, width = grid.shape[1:]
    ratio = math.sqrt(height * width / (max_tiles * side**2))
    if ratio <= 1.1:
        return grid
    shape = [int(height // ratio), int(width // ratio)]
    return torch.nn.functional.interpolate(grid[None], shape, mode="bilinear")[0]


def largest_image(config) -> tuple[int, int]:
    """(tiles, positions) of AnyRes-max's largest image: AnyRes's, the grid capped at `anyres_max_N` tiles' worth
    of features with its 10% slack (shrink's rule), a newline per row."""
    side, (rows, cols) = patches_per_side(config), largest_grid(config)
    cap = 1.1**2 * int(config.vision_aspect_ratio.removeprefix("anyres_max_")) * side**2
    return 1 + rows * cols, side**2 + int(min(rows * cols * side**2, cap)) + rows * side


FAMILY = Family(
    "llava_onevision", "LlavaOnevisionForConditionalGeneration", image_features, largest_image,
    template=TEMPLATE, followup=FOLLOWUP, followup_media=TEMPLATE, media_text=joined(""),
    video=Videos(siglip_frames, video_features, lambda config, n, size=None: n * pooled_side(config) ** 2 + 1),
    vision_modules=("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
)
