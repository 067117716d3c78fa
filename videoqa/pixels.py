"""Stage 2: CLIP preprocessing with Pillow.

Equal to transformers' `CLIPImageProcessorPil`: bicubic resize of the shortest
edge, centre crop, rescale by 1/255, normalise with the OpenAI CLIP mean/std.
Ours because transformers' video processors need torchvision.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


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


def clip_pixels(frames: np.ndarray | list[Image.Image], size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 frames or PIL images -> (N, 3, size, size) float32 tower input."""
    out = []
    for frame in frames:
        image = frame.convert("RGB") if isinstance(frame, Image.Image) else Image.fromarray(frame)
        image = center_crop(resize_shortest_edge(image, size), size)
        x = np.asarray(image).astype(np.float64) * (1 / 255)
        out.append(((x - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(2, 0, 1))
    return np.stack(out)
