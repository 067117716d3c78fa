"""Stage 3: pixels -> projected visual features, one row per placeholder position: the building blocks the
families (families/) are made of.

Each follows transformers' get_video_features / get_image_features, with the layer(s), select strategy, pooling and
grid read from the checkpoint's config: a tower's configured hidden layer (or layers, concatenated), CLS dropped
under the "default" select strategy; LLaVA-NeXT(-Video)'s AnyRes images, whose tiles go through the tower and
projector and are packed as transformers' `pack_image_features` does: the base tile, then the tile grid unpadded to
the image's aspect ratio with an `image_newline` after each row; and the largest image each tiling can make, for
the memory estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from videoqa.pixels import anyres_pixels, best_resolution


@dataclass(frozen=True)
class Visual:
    """What the vision side hands the prompt for one video or image: the rows spliced over its placeholder, and
    what some families need beside them (the feature cache keeps all of it)."""

    rows: torch.Tensor  # (N, D), one per placeholder position
    grid: torch.Tensor | None = None  # (items, 3): the tower's (t, h, w) patches per image or video (M-RoPE)
    layers: tuple[torch.Tensor, ...] = ()  # DeepStack: (N, D) per decoder layer it is added to
    times: tuple[float, ...] = ()  # each frame's time (s) in the video: what time-aware prompts and positions use

    def to(self, device, dtype) -> Visual:
        return Visual(self.rows.to(device, dtype), self.grid, tuple(t.to(device, dtype) for t in self.layers),
                      self.times)


def visual(features: torch.Tensor | Visual, times=()) -> Visual:
    """A family's features as a `Visual`: the LLaVA families' are its rows alone."""
    if isinstance(features, Visual):
        return Visual(features.rows, features.grid, features.layers, tuple(times)) if times else features
    return Visual(features, times=tuple(times))


def patches_per_side(config) -> int:
    """Patches along a tile's (or frame's) edge: 16 for CLIP at 224 px, 24 at 336 px, 27 for SigLIP at 384 px."""
    return config.vision_config.image_size // config.vision_config.patch_size


def _tensor(net, pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).to(net.device, net.dtype)  # (N, 3, H, W)


def hidden_layer(net, tower, pixels: np.ndarray) -> torch.Tensor:
    """The configured hidden layer of the tower, or the configured layers concatenated: (N, T, C)."""
    states = tower(_tensor(net, pixels), output_hidden_states=True).hidden_states
    layer = net.config.vision_feature_layer
    return states[layer] if isinstance(layer, int) else torch.cat([states[i] for i in layer], dim=-1)


def patches(net, tower, pixels: np.ndarray) -> torch.Tensor:
    """The hidden layer without CLS under the "default" select strategy: (N, T, C)."""
    hidden = hidden_layer(net, tower, pixels)
    return hidden[:, 1:] if net.config.vision_feature_select_strategy == "default" else hidden


@torch.inference_mode()
def anyres_image(net, image: Image.Image) -> torch.Tensor:
    """LLaVA-NeXT(-Video): AnyRes tiles through the tower and projector, packed -> (positions, D)."""
    size = net.config.vision_config.image_size
    pixels = anyres_pixels(image, size, net.config.image_grid_pinpoints)
    tiles = net.model.multi_modal_projector(patches(net, net.model.vision_tower, pixels))
    return pack(net, tiles, (image.height, image.width))


def pack(net, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1 + rows * cols, side * side, D) base tile and grid tiles of an image of `size` (h, w) -> (positions, D)."""
    return with_newlines(net, tiles[0], grid_of(net, tiles[1:], size))


def grid_of(net, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(rows * cols, side * side, D) grid tiles, row by row -> (D, H, W) feature map of the image, unpadded."""
    vision, side = net.config.vision_config, patches_per_side(net.config)
    grid_height, grid_width = best_resolution(size, net.config.image_grid_pinpoints)
    rows, cols = grid_height // vision.image_size, grid_width // vision.image_size
    grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, H, W)
    return unpad(grid, size)


def with_newlines(net, base: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
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


def single_image_bound(config) -> tuple[int, int]:
    """(tiles through the tower, positions) of any image of a one-tile family: its patches, CLS dropped."""
    return 1, patches_per_side(config) ** 2


def largest_grid(config) -> tuple[int, int]:
    """(rows, cols) of tiles of the largest grid among the checkpoint's pinpoints."""
    size = config.vision_config.image_size
    return max(((h // size, w // size) for h, w in config.image_grid_pinpoints), key=lambda g: g[0] * g[1])


def anyres_image_bound(config) -> tuple[int, int]:
    """(tiles, positions) of AnyRes's largest image: the base tile, then the largest grid with a newline per row
    (unpadding only takes positions away)."""
    side, (rows, cols) = patches_per_side(config), largest_grid(config)
    return 1 + rows * cols, side**2 + rows * side * (cols * side + 1)
