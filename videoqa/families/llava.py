"""LLaVA-1.5 (`llava`): still images only, one 336 px CLIP crop, CLS dropped (576 tokens)."""

from __future__ import annotations

import torch
from PIL import Image

from videoqa.families.base import Family
from videoqa.features import patches
from videoqa.pixels import clip_pixels


@torch.inference_mode()
def image_features(net, image: Image.Image) -> torch.Tensor:
    """A still image -> (patches, D); CLIP's shortest-edge resize and centre crop, CLS dropped."""
    model, size = net.model, net.config.vision_config.image_size
    return model.multi_modal_projector(patches(net, model.vision_tower, clip_pixels([image], size))).flatten(0, 1)


FAMILY = Family(
    "llava", "LlavaForConditionalGeneration", image_features,
    vision_modules=("model.vision_tower", "model.multi_modal_projector"),
)
