"""Stage 2: torchvision's tensor resize, in torch alone.

A port of `torchvision.transforms.v2.functional.resize` as torchvision 0.27.0 runs it on a plain tensor
(transforms/v2/functional/_geometry.py: `resize_image` and `_do_native_uint8_resize_on_cpu`), for the calls
transformers' video processors make: an explicit (height, width), antialias=True, BILINEAR, BICUBIC or LANCZOS.
Ours because transformers' video processors need torchvision, which this project does not install.

What torchvision does, and so what this does:
- the same size returns the input itself, untouched;
- the batch is flattened to (N, C, H, W); a single channels-last image is re-strided so that `interpolate` keeps
  channels-last (a layout fix, pytorch/pytorch#68430, the values are the same);
- uint8 on the CPU goes to `interpolate(..., antialias=True)` as uint8 for BICUBIC and LANCZOS, and for BILINEAR
  where the CPU has AVX2/AVX512 or is ARM (torch's own uint8 kernels: they differ from a float round trip by up
  to several grey levels);
- otherwise (BILINEAR on an older x86 CPU, or any uint8 off the CPU) it is cast to float32, interpolated,
  clamped to [0, 255] (BICUBIC and LANCZOS only), rounded, and cast back. Float inputs are interpolated as they are.
LANCZOS needs torch's `lanczos` mode (CPU only), as torchvision 0.27 does.
"""

from __future__ import annotations

import platform

import torch
from torch.nn.functional import interpolate

MODES = ("bilinear", "bicubic", "lanczos")
# The `resample` codes of preprocessor configs (PIL's), as transformers maps them onto torchvision's modes.
PIL_RESAMPLE = {1: "lanczos", 2: "bilinear", 3: "bicubic"}


def native_uint8(mode: str) -> bool:
    """Whether torchvision hands uint8 to `interpolate` as it is on the CPU: its benchmarks found the uint8
    bilinear kernel slower than a float round trip on x86 without AVX2, so there it casts."""
    if mode != "bilinear":
        return True
    if torch.compiler.is_compiling():
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize(images: torch.Tensor, size: tuple[int, int], *, mode: str) -> torch.Tensor:
    """(..., C, H, W) images -> (..., C, height, width), antialiased, bit for bit as torchvision 0.27's
    `resize(images, [height, width], interpolation=mode, antialias=True)`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    shape = images.shape
    channels, old_height, old_width = shape[-3:]
    height, width = size
    if (height, width) == (old_height, old_width):
        return images
    if images.numel() > 0:
        images = _resample(images.reshape(-1, channels, old_height, old_width), (height, width), mode)
    return images.reshape(shape[:-3] + (channels, height, width))


def _resample(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, height, width) by torchvision's dtype rules (see the module docstring)."""
    dtype = images.dtype
    acceptable = [torch.float32, torch.float64]
    if images.device.type == "cpu" and native_uint8(mode):
        acceptable.append(torch.uint8)
    numel, strides = images.numel(), images.stride()
    if images.is_contiguous(memory_format=torch.channels_last) and images.shape[0] == 1 and numel != strides[0]:
        images = images.as_strided(images.shape, (numel, *strides[1:]))  # keeps the output channels-last
    cast = dtype not in acceptable
    if cast:
        images = images.to(torch.float32)
    images = interpolate(images, size=list(size), mode=mode, align_corners=False, antialias=True)
    if cast:
        if mode in ("bicubic", "lanczos") and dtype == torch.uint8:
            images = images.clamp_(min=0, max=255)
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            images = images.round_()
        images = images.to(dtype=dtype)
    return images
