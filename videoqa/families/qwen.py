"""What the Qwen line (Qwen2.5-VL, Qwen3-VL) shares: ChatML; dynamic resolution (each frame or image resized to
multiples of patch x merge within the checkpoint's pixel bounds, so its tokens follow its size); the tower's merged
patches as the features (with DeepStack's per-layer rows where the tower makes them); 3-D M-RoPE positions from
transformers' own `get_rope_index` over the whole conversation.
"""

from __future__ import annotations

import math

import torch

from videoqa.decode import Positions
from videoqa.families.base import joined
from videoqa.features import Visual

# ChatML as the Qwen-VL checkpoints' chat templates render a user turn that opens with the media (Qwen2.5-VL's puts
# its default system turn before it); a later turn follows the answer's `<|im_end|>`
TURN = "<|im_start|>user\n<|vision_start|>{media}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
FOLLOWUP = "\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
FOLLOWUP_MEDIA = "\n" + TURN  # a later turn that opens with media
# several media in a turn, in the order given: each inside its own `<|vision_start|>...<|vision_end|>`
MEDIA = {"images_first": False, "media_text": joined("<|vision_end|><|vision_start|>"), "followup_media": FOLLOWUP_MEDIA}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN / _STD: the processors' defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen2VLImageProcessor's defaults, which both families' images take where preprocessor_config.json says nothing
IMAGE = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
         "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}}
REFERENCE = (720, 1280)  # the frame size estimates assume before a video is opened (a 720p video)


def bounds(config, kind: str, defaults: dict) -> dict:
    """The keyword arguments of pixels.qwen_*_pixels from the checkpoint's `kind` ("image" or "video")
    preprocessor settings over the processor class's `defaults`: `min_pixels`/`max_pixels` where the file names
    them, else the file's `size` (shortest_edge, longest_edge), else the defaults' `size`, as transformers'
    processors read them."""
    given = config.preprocessing[kind]
    found, size = {**defaults, **given}, given.get("size") or defaults["size"]
    return dict(patch_size=found["patch_size"], merge_size=found["merge_size"],
                temporal_patch_size=found["temporal_patch_size"],
                min_pixels=given.get("min_pixels") or size["shortest_edge"],
                max_pixels=given.get("max_pixels") or size["longest_edge"],
                image_mean=found.get("image_mean", CLIP_MEAN), image_std=found.get("image_std", CLIP_STD),
                resample=found.get("resample", 3))


@torch.inference_mode()
def tower(net, pixels: torch.Tensor, grid: tuple[int, int, int], *, video: bool) -> Visual:
    """Patches (grid (t, h, w)) through the vision tower and merger, as `get_video_features`/`get_image_features`
    run them: the merged rows, and DeepStack's rows per layer where the tower has them."""
    model, grid_thw = net.model, torch.tensor([grid], device=net.device)
    found = (model.get_video_features if video else model.get_image_features)(pixels.to(net.device), grid_thw)
    layers = getattr(found, "deepstack_features", None) or ()
    return Visual(found.pooler_output[0], grid_thw.cpu(), tuple(layer[0] for layer in layers))


def video_features(net, pixels: tuple[torch.Tensor, tuple[int, int, int]]) -> Visual:
    return tower(net, *pixels, video=True)


def image_features(net, image, bounds_of) -> Visual:
    """A still image at the checkpoint's image bounds (`bounds_of(config)`) through the tower."""
    from videoqa.pixels import qwen_image_pixels

    return tower(net, *qwen_image_pixels(image, **bounds_of(net.config)), video=False)


def tower_tokens(config, per_tile: int) -> int:
    """The tower's patches for `per_tile` merged tokens: merge x merge each."""
    return per_tile * config.vision_config.spatial_merge_size ** 2


def token_types(config, ids: torch.Tensor) -> torch.Tensor:
    """(B, T): 0 for text, 1 for an image's placeholder, 2 for a video's, as the processor's mm_token_type_ids."""
    return (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()


def seconds_per_grid(visual: Visual, temporal: int, default_fps: float) -> float:
    """The seconds a temporal patch spans: `temporal` frames at the frames' mean interval (transformers' processor
    takes temporal patch / sampled fps); one frame: at the processor's default fps."""
    times = visual.times
    if len(times) < 2 or times[-1] <= times[0]:
        return temporal / default_fps
    return temporal * (times[-1] - times[0]) / (len(times) - 1)


def rope_inputs(config, visuals: list[Visual], temporal: int, default_fps: float) -> dict:
    """The grids (images', videos', in prompt order) and seconds per temporal patch `get_rope_index` takes."""
    images = [v.grid for v in visuals if not v.times]
    videos = [v for v in visuals if v.times]
    return {"image_grid_thw": torch.cat(images) if images else None,
            "video_grid_thw": torch.cat([v.grid for v in videos]) if videos else None,
            "second_per_grid_ts": torch.tensor([seconds_per_grid(v, temporal, default_fps) for v in videos])
            if videos else None}


def rope_positions(net, ids: torch.Tensor, padding: torch.Tensor | None, past: int, visuals: list[Visual], *,
                   temporal: int, default_fps: float) -> Positions:
    """M-RoPE positions (3, B, T) of the tokens after `past` of the rows `ids` (the whole conversation), as
    `get_rope_index` places them over the whole rows (left padding masked as `generate` masks it); the first answer
    token follows the largest, as `generate`'s rope deltas place it."""
    batch = ids.shape[0]
    grids = {k: v if v is None else v.to(ids.device)
             for k, v in rope_inputs(net.config, visuals, temporal, default_fps).items()}
    whole, _ = net.model.get_rope_index(ids, token_types(net.config, ids), attention_mask=padding, **grids)
    return Positions(whole[..., past:], whole.amax(dim=(0, 2)).view(1, batch, 1).expand(3, batch, 1) + 1)


def video_tokens(config, bounds_of, frames: int, size: tuple[int, int] | None, *, clip_budget: bool) -> tuple:
    """(temporal patches, merged tokens per patch) of `frames` frames of `size` (REFERENCE when unknown)."""
    from videoqa.pixels import smart_resize

    found = bounds_of(config)
    height, width = size or REFERENCE
    patch, merge, temporal = found["patch_size"], found["merge_size"], found["temporal_patch_size"]
    if frames == 0:
        return 0, 0
    side = smart_resize(height, width, factor=patch * merge, min_pixels=found["min_pixels"],
                        max_pixels=found["max_pixels"], frames=max(frames, temporal) if clip_budget else None,
                        temporal_patch_size=temporal)
    return math.ceil(frames / temporal), (side[0] // (patch * merge)) * (side[1] // (patch * merge))


def largest_image(config, bounds_of) -> tuple[int, int]:
    """(tower tiles, positions) of the largest image the pixel bounds allow: one tile of max_pixels."""
    found = bounds_of(config)
    return 1, found["max_pixels"] // (found["patch_size"] * found["merge_size"]) ** 2
