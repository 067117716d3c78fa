"""LLaVA-NeXT-Video (`llava_next_video`): one CLIP tower; a frame loses CLS and is 2x2-pooled by the checkpoint's
`vision_resampler` before the projector (144 tokens at 336 px); images through AnyRes, as LLaVA-NeXT's."""

from __future__ import annotations

import numpy as np
import torch

from videoqa.families.base import Family, Videos, clip_frames
from videoqa.features import anyres_image, anyres_image_bound, patches, patches_per_side


@torch.inference_mode()
def video_features(net, pixels: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) frames -> (N * pooled tokens, D): CLS dropped, pooled by the resampler, then projected."""
    hidden = net.model.vision_resampler(patches(net, net.model.vision_tower, pixels))
    return net.model.multi_modal_projector(hidden).flatten(0, 1)


FAMILY = Family(
    "llava_next_video", "LlavaNextVideoForConditionalGeneration", anyres_image, anyres_image_bound,
    video=Videos(clip_frames, video_features,
                 lambda config, n, size=None: n * (patches_per_side(config) // config.spatial_pool_stride) ** 2),
    vision_modules=("model.vision_tower", "model.vision_resampler", "model.multi_modal_projector", "model.image_newline"),
)
