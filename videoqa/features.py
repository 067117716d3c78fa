"""Stage 3: pixels -> projected visual features, one row per placeholder position.

Follows transformers' VideoLlavaModel.get_video_features / get_image_features:
hidden layer `vision_feature_layer` (-2) of the CLIP tower, all 257 tokens per
frame for videos (CLS kept), CLS dropped for images under the "default" select
strategy, then the two-layer GELU projector.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def _encode(net, tower, pixels: np.ndarray, drop_cls: bool) -> torch.Tensor:
    x = torch.from_numpy(pixels).to(net.device, net.dtype)  # (N, 3, H, W)
    hidden = tower(x, output_hidden_states=True).hidden_states[net.config.vision_feature_layer]  # (N, T, C)
    if drop_cls:
        hidden = hidden[:, 1:]
    return net.model.multi_modal_projector(hidden).flatten(0, 1)  # (N * T, D)


def video_features(net, pixels: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) frames -> (N * 257, D) features, frame-major."""
    return _encode(net, net.model.video_tower, pixels, drop_cls=False)


def image_features(net, pixels: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) image -> (256, D) features."""
    return _encode(net, net.model.image_tower, pixels, drop_cls=net.config.vision_feature_select_strategy == "default")
