"""Stage 3: pixels -> projected visual features, one row per placeholder position.

The building blocks the families (families.py) are made of. Each follows transformers' get_video_features /
get_image_features, with the layer(s), select strategy, pooling and grid read from the checkpoint's config:
- Video-LLaVA: hidden layer `vision_feature_layer` (-2) of the video tower with all 257 tokens per frame
  (CLS kept); images through the image tower, CLS dropped under the "default" strategy; then the two-layer
  GELU projector.
- LLaVA-NeXT-Video: one tower; frames lose CLS and are 2x2-pooled by the checkpoint's `vision_resampler`
  before the projector (144 tokens per 336 px frame).
- LLaVA-NeXT(-Video) images: AnyRes tiles through the tower and projector, then packed as transformers'
  `pack_image_features` does: the base tile, then the tile grid unpadded to the image's aspect ratio with an
  `image_newline` after each row.
- LLaVA-OneVision (SigLIP, no CLS): frames through the tower's layer and the projector, then 2x2 bilinear
  pooling (27 x 27 -> 14 x 14 = 196 per 384 px frame), then one `image_newline` after the whole video; images
  through AnyRes-max: the tiles packed as LLaVA-NeXT's, but a grid larger than `anyres_max_N` allows (N base
  tiles' worth, with 10% slack) shrunk bilinearly before the `image_newline` of each row.
- LLaVA-1.5: one image through the CLIP tower's layer, CLS dropped under "default", then the projector (576 rows
  at 336 px).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from videoqa.pixels import anyres_max_pixels, anyres_pixels, best_resolution, clip_pixels


def patches_per_side(config) -> int:
    """Patches along a tile's (or frame's) edge: 16 for CLIP at 224 px, 24 at 336 px, 27 for SigLIP at 384 px."""
    return config.vision_config.image_size // config.vision_config.patch_size


def pooled_side(config) -> int:
    """Patches along a frame's edge after OneVision's 2x2 bilinear pooling, rounded up as its `apply_pooling`
    does: 27 -> 14 at 384 px."""
    return math.ceil(patches_per_side(config) / 2)


def _tensor(net, pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).to(net.device, net.dtype)  # (N, 3, H, W)


def _hidden(net, tower, pixels: np.ndarray) -> torch.Tensor:
    """The configured hidden layer of the tower, or the configured layers concatenated: (N, T, C)."""
    states = tower(_tensor(net, pixels), output_hidden_states=True).hidden_states
    layer = net.config.vision_feature_layer
    return states[layer] if isinstance(layer, int) else torch.cat([states[i] for i in layer], dim=-1)


def _patches(net, tower, pixels: np.ndarray) -> torch.Tensor:
    """The hidden layer without CLS under the "default" select strategy: (N, T, C)."""
    hidden = _hidden(net, tower, pixels)
    return hidden[:, 1:] if net.config.vision_feature_select_strategy == "default" else hidden


@torch.inference_mode()
def video_llava_video(net, pixels: np.ndarray) -> torch.Tensor:
    """Video-LLaVA: (N, 3, H, W) frames through the video tower, all tokens (CLS kept) -> (N * T, D), frame-major."""
    return net.model.multi_modal_projector(_hidden(net, net.model.video_tower, pixels)).flatten(0, 1)


@torch.inference_mode()
def video_llava_image(net, image: Image.Image) -> torch.Tensor:
    """Video-LLaVA: a still image through the image tower, CLS dropped -> (256, D) at 224 px."""
    size = net.config.vision_config.image_size
    return net.model.multi_modal_projector(_patches(net, net.model.image_tower, clip_pixels([image], size))).flatten(0, 1)


@torch.inference_mode()
def pooled_video(net, pixels: np.ndarray) -> torch.Tensor:
    """LLaVA-NeXT-Video: frames lose CLS and are 2x2-pooled by the `vision_resampler` before the projector."""
    hidden = net.model.vision_resampler(_patches(net, net.model.vision_tower, pixels))
    return net.model.multi_modal_projector(hidden).flatten(0, 1)


@torch.inference_mode()
def anyres_image(net, image: Image.Image) -> torch.Tensor:
    """LLaVA-NeXT(-Video): AnyRes tiles through the tower and projector, packed -> (positions, D)."""
    size = net.config.vision_config.image_size
    pixels = anyres_pixels(image, size, net.config.image_grid_pinpoints)
    tiles = net.model.multi_modal_projector(_patches(net, net.model.vision_tower, pixels))
    return pack(net, tiles, (image.height, image.width))


def pack(net, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1 + rows * cols, side * side, D) base tile and grid tiles of an image of `size` (h, w) -> (positions, D)."""
    return _rows(net, tiles[0], _grid(net, tiles[1:], size))


def _grid(net, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(rows * cols, side * side, D) grid tiles, row by row -> (D, H, W) feature map of the image, unpadded."""
    vision, side = net.config.vision_config, patches_per_side(net.config)
    grid_height, grid_width = best_resolution(size, net.config.image_grid_pinpoints)
    rows, cols = grid_height // vision.image_size, grid_width // vision.image_size
    grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, H, W)
    return unpad(grid, size)


def _rows(net, base: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(T, D) base tile and (D, H, W) feature map -> (T + H * (W + 1), D): the map row by row, each row ending with
    `image_newline`."""
    newline = net.model.image_newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid.dtype)  # (D, H, 1)
    grid = torch.cat([grid, newline], dim=-1)  # (D, H, W + 1)
    return torch.cat([base, grid.flatten(1, 2).T])


def unpad(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(D, H, W) feature grid -> the rows or columns that hold the image, not the black padding around it."""
    height, width = size
    grid_height, grid_width = grid.shape[1:]
    if width / height > grid_width / grid_height:  # padded above and below
        kept = int(round(height * (grid_width / width), 7))
        pad = (grid_height - kept) // 2
        return grid[:, pad : grid_height - pad]
    kept = int(round(width * (grid_height / height), 7))  # padded left and right
    pad = (grid_width - kept) // 2
    return grid[:, :, pad : grid_width - pad]


@torch.inference_mode()
def onevision_video(net, pixels: np.ndarray) -> torch.Tensor:
    """LLaVA-OneVision: (N, 3, H, W) frames -> (N * pooled tokens + 1, D), frame-major, then `image_newline` once."""
    model = net.model
    projected = model.multi_modal_projector(_patches(net, model.vision_tower, pixels))  # (N, side * side, D)
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
def anyres_max_image(net, image: Image.Image) -> torch.Tensor:
    """LLaVA-OneVision: a still image -> (positions, D) under AnyRes-max: base tile, then the (possibly shrunk) grid
    with a newline per row."""
    model, size = net.model, net.config.vision_config.image_size
    pixels = anyres_max_pixels(image, size, net.config.image_grid_pinpoints)  # (1 + tiles, 3, size, size)
    tiles = model.multi_modal_projector(_patches(net, model.vision_tower, pixels))  # (1 + tiles, side * side, D)
    return pack_max(net, tiles, (image.height, image.width))


def pack_max(net, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """OneVision's `pack_image_features`: (1 + rows * cols, side * side, D) tiles of an image of `size` (h, w) ->
    (positions, D); as `pack`, with the anyres_max downscale between the unpadding and the newlines."""
    grid = shrink(_grid(net, tiles[1:], size), patches_per_side(net.config), net.config.vision_aspect_ratio)
    return _rows(net, tiles[0], grid)


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


@torch.inference_mode()
def llava_image(net, image: Image.Image) -> torch.Tensor:
    """LLaVA-1.5: a still image -> (patches, D); CLIP's shortest-edge resize and centre crop, CLS dropped."""
    model, size = net.model, net.config.vision_config.image_size
    return model.multi_modal_projector(_patches(net, model.vision_tower, clip_pixels([image], size))).flatten(0, 1)


def single_image_bound(config) -> tuple[int, int]:
    """(tiles through the tower, positions) of any image of a one-tile family: its patches, CLS dropped."""
    return 1, patches_per_side(config) ** 2


def _largest_grid(config) -> tuple[int, int]:
    """(rows, cols) of tiles of the largest grid among the checkpoint's pinpoints."""
    size = config.vision_config.image_size
    return max(((h // size, w // size) for h, w in config.image_grid_pinpoints), key=lambda g: g[0] * g[1])


def anyres_image_bound(config) -> tuple[int, int]:
    """(tiles, positions) of AnyRes's largest image: the base tile, then the largest grid with a newline per row
    (unpadding only takes positions away)."""
    side, (rows, cols) = patches_per_side(config), _largest_grid(config)
    return 1 + rows * cols, side**2 + rows * side * (cols * side + 1)


def anyres_max_image_bound(config) -> tuple[int, int]:
    """(tiles, positions) of AnyRes-max's largest image: as AnyRes's, the grid capped at `anyres_max_N` tiles'
    worth of features with its 10% slack (shrink's rule), a newline per row."""
    side, (rows, cols) = patches_per_side(config), _largest_grid(config)
    cap = 1.1**2 * int(config.vision_aspect_ratio.removeprefix("anyres_max_")) * side**2
    return 1 + rows * cols, side**2 + int(min(rows * cols * side**2, cap)) + rows * side
