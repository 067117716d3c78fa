"""Stage 2: the towers' pixels, equal to transformers' image and video processors: Pillow, and torch for videos.

CLIP (`clip_pixels`), equal to transformers' `CLIPImageProcessorPil`: transparency composited onto white,
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

Qwen2-VL, Qwen2.5-VL and Qwen3-VL (`qwen_image_pixels`, `qwen_video_pixels`): `smart_resize` picks a size whose
sides are multiples of patch x merge with the pixels within the config's bounds, bicubic resize, normalise, and
cut into flat patches of (3, temporal patch, patch, patch), each merge x merge block of neighbours in a row.
Images equal `Qwen2VLImageProcessorPil` (Qwen3-VL reuses it, at 16 px patches); a still image fills the temporal patch with
copies of itself. Videos equal `Qwen2VLVideoProcessor` (Qwen2/2.5-VL) and `Qwen3VLVideoProcessor`, run with
torchvision 0.27: resized as uint8 tensors by `videoqa.resize`, normalised in transformers' torch order (1/255
folded into mean and std), an odd frame count padded with copies of the last frame.

SmolVLM2 (`smolvlm_image_pixels`, `smolvlm_video_pixels`): the longest edge to the config's `size` (Lanczos),
then images are split into max_image_size tiles plus the whole image squashed to one (`SmolVLMImageProcessorPil`)
and video frames are squashed to one such square (`SmolVLMVideoProcessor`, torchvision's Lanczos).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from videoqa.errors import Exit, VideoQAError
from videoqa.frames import rgb
from videoqa.resize import PIL_RESAMPLE, resize

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


def _fused_normalise(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 as transformers' torch processors do it (`TorchvisionBackend.
    rescale_and_normalize`): the 1/255 folded into mean and std (x 255 in float32), then (x - mean) / std in
    float32. Not the PIL processors' x / 255 first (`_normalise`): the two differ in the last bits."""
    scale = 1.0 / (1 / 255)  # 1 / rescale_factor
    mean = (torch.tensor([float(m) for m in mean]) * scale).to(torch.float32).view(-1, 1, 1)
    std = (torch.tensor([float(s) for s in std]) * scale).to(torch.float32).view(-1, 1, 1)
    return video.to(torch.float32).sub_(mean).div_(std)


def _frames_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) contiguous, the layout transformers' video processors resize."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int,
    frames: int | None = None, temporal_patch_size: int = 2,
) -> tuple[int, int]:
    """The (height, width) Qwen's processors resize to: sides rounded to multiples of `factor` (patch x merge),
    scaled by one factor when the pixels fall outside [min_pixels, max_pixels], the aspect ratio nearly kept.

    frames=None: the bounds hold per image or frame (`Qwen2VLImageProcessorPil`, for the images of all three
    lines, and `Qwen2VLVideoProcessor`). frames=N: `Qwen3VLVideoProcessor`'s rule, where they hold for the whole
    clip (N rounded to the temporal patch, x height x width) and a side under `factor` is first scaled up to it."""
    rounded_frames = 1
    if frames is not None:
        if frames < temporal_patch_size:
            raise VideoQAError(f"Qwen3-VL needs at least {temporal_patch_size} frames of a video, not {frames}")
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        rounded_frames = round(frames / temporal_patch_size) * temporal_patch_size
    frames = frames or 1
    if max(height, width) / min(height, width) > 200:
        raise VideoQAError(f"a {width}x{height} picture is too narrow for Qwen (sides over 200:1)", Exit.INPUT)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if rounded_frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif rounded_frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _patchify(
    video: torch.Tensor, *, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, 3, H, W), T a multiple of the temporal patch -> (t * h * w, 3 * temporal * patch * patch) rows,
    each merge x merge block of patches in a row, and the grid (t, h, w)."""
    count, channels, height, width = video.shape
    grid = (count // temporal_patch_size, height // patch_size, width // patch_size)
    blocks = video.reshape(grid[0], temporal_patch_size, channels, grid[1] // merge_size, merge_size, patch_size,
                           grid[2] // merge_size, merge_size, patch_size)
    # (t, h / merge, w / merge, merge, merge, channel, temporal, patch, patch), as transformers' patchify
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(math.prod(grid), channels * temporal_patch_size * patch_size ** 2), grid


def qwen_image_pixels(
    image: Image.Image, *, patch_size: int, merge_size: int, temporal_patch_size: int, min_pixels: int,
    max_pixels: int, image_mean: Sequence[float], image_std: Sequence[float], resample: int = 3,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A picture -> (h * w, 3 * temporal * patch * patch) float32 patches and the grid (1, h, w): transformers'
    `pixel_values` and `image_grid_thw` from `Qwen2VLImageProcessorPil`, which Qwen2.5-VL and Qwen3-VL use too.

    From preprocessor_config.json: patch_size, merge_size, temporal_patch_size, image_mean, image_std, resample
    (PIL's code, 3 = bicubic); min_pixels / max_pixels are its keys of those names (Qwen2/2.5-VL) or
    size.shortest_edge / size.longest_edge (Qwen3-VL)."""
    image = rgb(image)
    height, width = smart_resize(image.height, image.width, factor=patch_size * merge_size,
                                 min_pixels=min_pixels, max_pixels=max_pixels)
    pixels = _normalise(image.resize((width, height), resample), np.asarray(image_mean, np.float32),
                        np.asarray(image_std, np.float32))
    still = torch.from_numpy(pixels)[None].expand(temporal_patch_size, -1, -1, -1)  # fills the temporal patch
    return _patchify(still, patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)


def qwen_video_pixels(
    frames: np.ndarray, *, patch_size: int, merge_size: int, temporal_patch_size: int, min_pixels: int,
    max_pixels: int, image_mean: Sequence[float], image_std: Sequence[float], resample: int = 3,
    clip_budget: bool = False,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, H, W, 3) uint8 frames -> (t * h * w, 3 * temporal * patch * patch) float32 patches and the grid (t, h,
    w): `pixel_values_videos` and `video_grid_thw` from `Qwen2VLVideoProcessor` (Qwen2/2.5-VL) or, with
    clip_budget=True, `Qwen3VLVideoProcessor` (min/max_pixels bound the whole clip), with torchvision 0.27.
    An odd frame count gets the last frame repeated (t = ceil(T / temporal)).

    Config keys as for `qwen_image_pixels`, from video_preprocessor_config.json where the checkpoint has one
    (Qwen3-VL), else preprocessor_config.json, as transformers falls back (Qwen2.5-VL: its min/max_pixels, 3136
    and 12845056, not the class's 128 x 28 x 28 and 768 x 28 x 28). Not applied: `cap_pixels_per_frame`, off in
    transformers 5.24 unless a config or call turns it on."""
    video = _frames_tensor(frames)
    size = smart_resize(video.shape[2], video.shape[3], factor=patch_size * merge_size, min_pixels=min_pixels,
                        max_pixels=max_pixels, frames=len(video) if clip_budget else None,
                        temporal_patch_size=temporal_patch_size)
    video = _fused_normalise(resize(video, size, mode=PIL_RESAMPLE[resample]), image_mean, image_std)
    if pad := -len(video) % temporal_patch_size:
        video = torch.cat((video, video[-1:].expand(pad, -1, -1, -1)))
    return _patchify(video, patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)


SMOLVLM_MAX_SIDE = 4096  # transformers' MAX_IMAGE_SIZE for SmolVLM: no resize goes past 4k


def _longest_edge_to(height: int, width: int, longest: int, *, even: bool = True) -> tuple[int, int]:
    """SmolVLM's resize target: the longest edge to `longest`, the other by the aspect ratio, truncated and
    (even=True) rounded up to an even number, as transformers' `_resize_output_size_rescale_to_max_len`."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2 if even else 0
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2 if even else 0
    return max(height, 1), max(width, 1)


def _tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """The size SmolVLM resizes a picture to before splitting: both sides up to multiples of the tile, the
    shorter side from the longer by the aspect ratio (`resize_for_vision_encoder`)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        return math.ceil(int(width / aspect) / tile) * tile, width
    height = math.ceil(height / tile) * tile
    return height, math.ceil(int(height * aspect) / tile) * tile


def _smolvlm_tiles(image: Image.Image, tile: int, resample: int) -> tuple[list[Image.Image], tuple[int, int]]:
    """The image's tile x tile crops row by row, then the whole image squashed to one tile; (rows, cols), or
    the image alone and (0, 0) when it is one tile already (`split_images`)."""
    if image.height <= tile and image.width <= tile:
        return [image], (0, 0)
    rows, cols = (image.height - tile) // tile + 1, (image.width - tile) // tile + 1
    crops = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    return [*crops, image.resize((tile, tile), resample)], (rows, cols)


def smolvlm_image_pixels(
    image: Image.Image, *, size: int, max_image_size: int, image_mean: Sequence[float], image_std: Sequence[float],
    resample: int = 1, do_image_splitting: bool = True,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A picture -> (1, tiles, 3, max_image_size, max_image_size) float32 and the (rows, cols) of its split
    ((0, 0): not split; the prompt needs them): `SmolVLMImageProcessorPil`'s pixel_values, whose
    pixel_attention_mask is then all ones (every tile is full), which the model assumes when it gets none.

    From preprocessor_config.json: size = size.longest_edge (the picture is first resized, up or down, to it),
    max_image_size = max_image_size.longest_edge, image_mean, image_std, resample (PIL's code, 1 = Lanczos),
    do_image_splitting."""
    image = rgb(image)
    height, width = _longest_edge_to(image.height, image.width, size)
    if max(height, width) > SMOLVLM_MAX_SIDE:
        height, width = _longest_edge_to(height, width, SMOLVLM_MAX_SIDE, even=False)
    image = image.resize((width, height), resample)
    if do_image_splitting:
        height, width = _tile_multiple(image.height, image.width, max_image_size)
        tiles, split = _smolvlm_tiles(image.resize((width, height), resample), max_image_size, resample)
    else:
        tiles, split = [image.resize((max_image_size, max_image_size), resample)], (0, 0)
    mean, std = np.asarray(image_mean, np.float32), np.asarray(image_std, np.float32)
    return torch.from_numpy(np.stack([_normalise(tile, mean, std) for tile in tiles]))[None], split


def smolvlm_video_pixels(
    frames: np.ndarray, *, size: int, max_image_size: int, image_mean: Sequence[float], image_std: Sequence[float],
    resample: int = 1,
) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (1, T, 3, max_image_size, max_image_size) float32: `SmolVLMVideoProcessor`'s
    pixel_values with torchvision 0.27 (Lanczos on uint8 tensors): the longest edge to `size`, then squashed to
    the square. Its pixel_attention_mask is all ones (no frame is padded), which the model assumes when it gets none.

    From preprocessor_config.json: size = size.longest_edge, which transformers puts over video_sampling.video_size
    when a config has both (SmolVLM2's do: 2048 over 512, so frames are first scaled up); max_image_size =
    max_image_size.longest_edge; image_mean, image_std; resample (1 = Lanczos)."""
    video = _frames_tensor(frames)
    mode = PIL_RESAMPLE[resample]
    video = resize(video, _longest_edge_to(video.shape[2], video.shape[3], min(SMOLVLM_MAX_SIDE, size)), mode=mode)
    video = resize(video, (max_image_size, max_image_size), mode=mode)
    return _fused_normalise(video, image_mean, image_std)[None]
