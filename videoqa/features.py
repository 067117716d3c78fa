"""Stage 3: pixels -> projected visual features, one row per placeholder position.

Follows transformers' get_video_features / get_image_features of each architecture
(`config.model_type`), with the layer(s), select strategy, pooling and grid read
from the checkpoint's config:
- video_llava: hidden layer `vision_feature_layer` (-2) of the video tower with all
  257 tokens per frame (CLS kept); images through the image tower, CLS dropped
  under the "default" strategy; then the two-layer GELU projector.
- llava_next_video: one tower; video frames lose CLS and are 2x2-pooled by the
  checkpoint's `vision_resampler` before the projector (144 tokens per 336 px frame).
- llava_next and llava_next_video images: AnyRes tiles through the tower and
  projector, then packed as transformers' `pack_image_features` does: the base tile,
  then the tile grid unpadded to the image's aspect ratio with an `image_newline`
  after each row.
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
def video_features(net, pixels: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) frames -> (N * tokens per frame, D) features, frame-major."""
    model = net.model
    if net.config.model_type == "video_llava":
        hidden = _hidden(net, model.video_tower, pixels)
    else:  # llava_next_video
        hidden = model.vision_resampler(_patches(net, model.vision_tower, pixels))
    return model.multi_modal_projector(hidden).flatten(0, 1)


@torch.inference_mode()
def image_features(net, image: Image.Image) -> torch.Tensor:
    """A still image -> (positions, D) features; the count depends on its size under AnyRes."""
    model, size = net.model, net.config.vision_config.image_size
    if net.config.model_type == "video_llava":
        return model.multi_modal_projector(_patches(net, model.image_tower, clip_pixels([image], size))).flatten(0, 1)
    tiles = model.multi_modal_projector(
        _patches(net, model.vision_tower, anyres_pixels(image, size, net.config.image_grid_pinpoints))
    )
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
