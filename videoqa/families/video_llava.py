"""Video-LLaVA (`video_llava`): two CLIP towers, one for videos and one for images. A frame keeps all its tokens
(CLS too: 257 at 224 px), an image drops CLS (256); both through the two-layer GELU projector."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from videoqa.families.base import Family, Videos, clip_frames
from videoqa.features import hidden_layer, patches, patches_per_side
from videoqa.pixels import clip_pixels


@torch.inference_mode()
def video_features(net, pixels: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) frames through the video tower, all tokens (CLS kept) -> (N * T, D), frame-major."""
    return net.model.multi_modal_projector(hidden_layer(net, net.model.video_tower, pixels)).flatten(0, 1)


@torch.inference_mode()
def image_features(net, image: Image.Image) -> torch.Tensor:
    """A still image through the image tower, CLS dropped -> (256, D) at 224 px."""
    size = net.config.vision_config.image_size
    return net.model.multi_modal_projector(patches(net, net.model.image_tower, clip_pixels([image], size))).flatten(0, 1)


FAMILY = Family(
    "video_llava", "VideoLlavaForConditionalGeneration", image_features,
    video=Videos(clip_frames, video_features, lambda config, n, size=None: n * (patches_per_side(config) ** 2 + 1)),
    vision_modules=("model.video_tower", "model.image_tower", "model.multi_modal_projector"),
)
