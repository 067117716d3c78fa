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
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from videoqa.pixels import anyres_pixels, best_resolution, clip_pixels


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
    vision = net.config.vision_config
    side = vision.image_size // vision.patch_size  # patches along a tile's edge
    grid_height, grid_width = best_resolution(size, net.config.image_grid_pinpoints)
    rows, cols = grid_height // vision.image_size, grid_width // vision.image_size
    grid = tiles[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, H, W)
    grid = unpad(grid, size)
    newline = net.model.image_newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid.dtype)  # (D, H, 1)
    grid = torch.cat([grid, newline], dim=-1)  # (D, H, W + 1)
    return torch.cat([tiles[0], grid.flatten(1, 2).T])


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
