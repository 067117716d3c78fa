"""Stage 2: CLIP and SigLIP preprocessing with Pillow.

Equal to transformers' `CLIPImageProcessorPil`: transparency composited onto white,
bicubic resize of the shortest edge, centre crop, rescale by 1/255, normalise with
the OpenAI CLIP mean/std.
Ours because transformers' video processors need torchvision.

LLaVA-NeXT's AnyRes for still images (equal to `LlavaNextImageProcessorPil`):
pick the best-fit grid from the checkpoint's `image_grid_pinpoints`, resize the
image into it keeping its aspect ratio, pad with black, cut it into tiles, and
put the whole image squashed to one tile first.

LLaVA-OneVision (SigLIP at 384 px): `siglip_pixels` squashes each frame or image to
size x size (bicubic, no crop) and normalises with mean = std = 0.5, as the
checkpoints' preprocessor configs say; equal to `SiglipImageProcessorPil` and to the
base tile of `LlavaOnevisionImageProcessorPil` (frames too: transformers' OneVision
video processor needs torchvision, as the others do). Its AnyRes-max tiling
(`anyres_max_pixels`) cuts the same tiles as LLaVA-NeXT's (the "max 9" rule acts
on the features, not the pixels); equal to `LlavaOnevisionImageProcessorPil`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from videoqa.frames import rgb

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SIGLIP_MEAN = SIGLIP_STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    top, left = (height - size) // 2, (width - size) // 2
    return image.crop((left, top, left + size, top + size))


def _rgb(frame: np.ndarray | Image.Image) -> Image.Image:
    return rgb(frame) if isinstance(frame, Image.Image) else Image.fromarray(frame)


def _normalise(image: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(H, W) RGB image -> (3, H, W) float32: x / 255 (in float64, then float32), then (x - mean) / std in
    float32: transformers' order and precisions, so the pixels are its bits (an int8 model's activation rounding
    turns a last-bit difference into another answer)."""
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def clip_pixels(frames: np.ndarray | list[Image.Image], size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 frames or PIL images -> (N, 3, size, size) float32 tower input."""
    crops = [center_crop(resize_shortest_edge(_rgb(frame), size), size) for frame in frames]
    return np.stack([_normalise(crop, CLIP_MEAN, CLIP_STD) for crop in crops])


def siglip_pixels(frames: np.ndarray | list[Image.Image], size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 frames or PIL images -> (N, 3, size, size) float32 SigLIP input.

    Squashed to a square whatever the aspect ratio (SigLIP was trained so): no crop, no padding."""
    squares = [_rgb(frame).resize((size, size), Image.BICUBIC) for frame in frames]
    return np.stack([_normalise(square, SIGLIP_MEAN, SIGLIP_STD) for square in squares])


def best_resolution(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """The (height, width) grid of `pinpoints` that keeps the most of the image's pixels, then wastes the least."""
    height, width = size

    def fit(pinpoint: list[int]) -> tuple[int, int]:
        grid_height, grid_width = pinpoint
        scale = min(grid_width / width, grid_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        return kept, kept - grid_width * grid_height  # max() keeps the first of equals, as transformers does

    grid_height, grid_width = max(pinpoints, key=fit)
    return grid_height, grid_width


def fit_and_pad(image: Image.Image, grid: tuple[int, int]) -> Image.Image:
    """The image resized to fit the grid with its aspect ratio kept, centred on black."""
    grid_height, grid_width = grid
    scale_w, scale_h = grid_width / image.width, grid_height / image.height
    if scale_w < scale_h:
        size = (grid_width, min(math.ceil(image.height * scale_w), grid_height))
    else:
        size = (min(math.ceil(image.width * scale_h), grid_width), grid_height)
    canvas = Image.new("RGB", (grid_width, grid_height))
    canvas.paste(image.resize(size, Image.BICUBIC), ((grid_width - size[0]) // 2, (grid_height - size[1]) // 2))
    return canvas


def anyres_tiles(image: Image.Image, size: int, pinpoints: list[list[int]]) -> list[Image.Image]:
    """The image squashed to one size x size tile, then the tiles of its best-fit grid, row by row (RGB)."""
    image = rgb(image)
    grid_height, grid_width = best_resolution((image.height, image.width), pinpoints)
    padded = fit_and_pad(image, (grid_height, grid_width))
    tiles = [
        padded.crop((x, y, min(x + size, grid_width), min(y + size, grid_height)))
        for y in range(0, grid_height, size)
        for x in range(0, grid_width, size)
    ]
    return [image.resize((size, size), Image.BICUBIC), *tiles]


def anyres_pixels(image: Image.Image, size: int, pinpoints: list[list[int]]) -> np.ndarray:
    """LLaVA-NeXT's AnyRes: the image squashed to one tile, then the tiles of its best-fit grid, row by row.

    (1 + tiles, 3, size, size) float32; equal to transformers' `LlavaNextImageProcessorPil`.
    """
    return clip_pixels(anyres_tiles(image, size, pinpoints), size)


def anyres_max_pixels(image: Image.Image, size: int, pinpoints: list[list[int]]) -> np.ndarray:
    """LLaVA-OneVision's AnyRes-max tiles: (1 + tiles, 3, size, size) float32, SigLIP-normalised.

    The same tiles as LLaVA-NeXT (`LlavaOnevisionImageProcessorPil` resizes and pads for the grid
    alike); the tiles are already size x size, so SigLIP's squash leaves them as they are. The
    "max 9" of anyres_max_9 caps the features per image, not the tiles (see families/llava_onevision.py)."""
    return siglip_pixels(anyres_tiles(image, size, pinpoints), size)
