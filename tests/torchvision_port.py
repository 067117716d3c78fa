"""The reference for the video pixels: torchvision 0.27.0's tensor functions that transformers' video processors
call, transcribed line by line into torch (read from the torchvision-0.27.0 cp311 manylinux wheel, not installed:
it cannot run here), and `fake_torchvision`, which serves them as the `torchvision` package so that transformers'
own video processors run on them.

Kept apart from videoqa/resize.py on purpose: this follows torchvision's source (paths and line numbers are
torchvision 0.27.0's), that one is ours.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import platform
import sys
import types
from enum import Enum
from typing import Optional, Union

import torch
from torch.nn.functional import interpolate


# torchvision/transforms/functional.py:23-36
class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    # For PIL compatibility
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


# torchvision/transforms/functional.py:41-50
def _interpolation_modes_from_int(i: int) -> InterpolationMode:
    inverse_modes_mapping = {
        0: InterpolationMode.NEAREST,
        2: InterpolationMode.BILINEAR,
        3: InterpolationMode.BICUBIC,
        4: InterpolationMode.BOX,
        5: InterpolationMode.HAMMING,
        1: InterpolationMode.LANCZOS,
    }
    return inverse_modes_mapping[i]


# torchvision/transforms/functional.py:353-384 (imported into v2 as `__compute_resized_output_size`)
def _v1_compute_resized_output_size(image_size, size, max_size=None, allow_size_none=False) -> list[int]:
    h, w = image_size
    short, long = (w, h) if w <= h else (h, w)
    if size is None:
        if not allow_size_none:
            raise ValueError("This should never happen!!")
        if not isinstance(max_size, int):
            raise ValueError(f"max_size must be an integer when size is None, but got {max_size} instead.")
        new_short, new_long = int(max_size * short / long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    elif len(size) == 1:  # specified size only for the smallest edge
        requested_new_short = size if isinstance(size, int) else size[0]
        new_short, new_long = requested_new_short, int(requested_new_short * long / short)
        if max_size is not None:
            if max_size <= requested_new_short:
                raise ValueError("max_size must be strictly greater than the requested size for the smaller edge")
            if new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:  # specified both h and w
        new_w, new_h = size[1], size[0]
    return [new_h, new_w]


# torchvision/transforms/v2/functional/_geometry.py:33-41
def _check_interpolation(interpolation: Union[InterpolationMode, int]) -> InterpolationMode:
    if isinstance(interpolation, int):
        interpolation = _interpolation_modes_from_int(interpolation)
    elif not isinstance(interpolation, InterpolationMode):
        raise ValueError(f"Argument interpolation should be an `InterpolationMode`, but got {interpolation}.")
    return interpolation


# torchvision/transforms/v2/functional/_geometry.py:226-236
def _compute_resized_output_size(canvas_size, size, max_size=None) -> list[int]:
    if isinstance(size, int):
        size = [size]
    elif max_size is not None and size is not None and len(size) != 1:
        raise ValueError("max_size should only be passed if size is None or specifies the length of the smaller edge")
    return _v1_compute_resized_output_size(canvas_size, size=size, max_size=max_size, allow_size_none=True)


# torchvision/transforms/v2/functional/_geometry.py:239-253; a plain tensor's kernel is resize_image (:273-274)
def resize(inpt: torch.Tensor, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    if type(inpt) is not torch.Tensor:
        raise NotImplementedError("only plain tensors are transcribed")
    return resize_image(inpt, size=size, interpolation=interpolation, max_size=max_size, antialias=antialias)


# torchvision/transforms/v2/functional/_geometry.py:260-272
def _do_native_uint8_resize_on_cpu(interpolation: InterpolationMode) -> bool:
    if interpolation == InterpolationMode.BILINEAR:
        if torch.compiler.is_compiling() or torch.jit.is_scripting():
            return True
        else:
            return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
                "aarch64",
                "arm64",
            )

    return interpolation == InterpolationMode.BICUBIC or interpolation == InterpolationMode.LANCZOS


# torchvision/transforms/v2/functional/_geometry.py:275-352
def resize_image(
    image: torch.Tensor,
    size: Optional[list[int]],
    interpolation: Union[InterpolationMode, int] = InterpolationMode.BILINEAR,
    max_size: Optional[int] = None,
    antialias: Optional[bool] = True,
) -> torch.Tensor:
    interpolation = _check_interpolation(interpolation)
    antialias = False if antialias is None else antialias
    align_corners: Optional[bool] = None
    if (
        interpolation == InterpolationMode.BILINEAR
        or interpolation == InterpolationMode.BICUBIC
        or interpolation == InterpolationMode.LANCZOS
    ):
        align_corners = False
        if interpolation == InterpolationMode.LANCZOS and not antialias:
            raise ValueError("InterpolationMode.LANCZOS requires antialias=True")
    else:
        antialias = False

    shape = image.shape
    numel = image.numel()
    num_channels, old_height, old_width = shape[-3:]
    new_height, new_width = _compute_resized_output_size((old_height, old_width), size=size, max_size=max_size)

    if (new_height, new_width) == (old_height, old_width):
        return image
    elif numel > 0:
        dtype = image.dtype
        acceptable_dtypes = [torch.float32, torch.float64]
        if interpolation == InterpolationMode.NEAREST or interpolation == InterpolationMode.NEAREST_EXACT:
            acceptable_dtypes.append(torch.uint8)
        elif image.device.type == "cpu":
            if _do_native_uint8_resize_on_cpu(interpolation):
                acceptable_dtypes.append(torch.uint8)

        image = image.reshape(-1, num_channels, old_height, old_width)
        strides = image.stride()
        if image.is_contiguous(memory_format=torch.channels_last) and image.shape[0] == 1 and numel != strides[0]:
            new_strides = list(strides)
            new_strides[0] = numel
            image = image.as_strided((1, num_channels, old_height, old_width), new_strides)

        need_cast = dtype not in acceptable_dtypes
        if need_cast:
            image = image.to(dtype=torch.float32)

        image = interpolate(
            image,
            size=[new_height, new_width],
            mode=interpolation.value,
            align_corners=align_corners,
            antialias=antialias,
        )

        if need_cast:
            if (
                interpolation == InterpolationMode.BICUBIC or interpolation == InterpolationMode.LANCZOS
            ) and dtype == torch.uint8:
                image = image.clamp_(min=0, max=255)
            if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
                image = image.round_()
            image = image.to(dtype=dtype)

    return image.reshape(shape[:-3] + (num_channels, new_height, new_width))


# torchvision/transforms/v2/functional/_misc.py:19-32 (dispatch) and :37-67 (normalize_image)
def normalize(inpt: torch.Tensor, mean: list[float], std: list[float], inplace: bool = False) -> torch.Tensor:
    image = inpt
    if not image.is_floating_point():
        raise TypeError(f"Input tensor should be a float tensor. Got {image.dtype}.")
    if image.ndim < 3:
        raise ValueError(f"Expected tensor to be a tensor image of size (..., C, H, W). Got {image.shape}.")
    if isinstance(std, (tuple, list)):
        divzero = not all(std)
    elif isinstance(std, (int, float)):
        divzero = std == 0
    else:
        divzero = False
    if divzero:
        raise ValueError("std evaluated to zero, leading to division by zero.")
    dtype = image.dtype
    device = image.device
    mean = torch.as_tensor(mean, dtype=dtype, device=device)
    std = torch.as_tensor(std, dtype=dtype, device=device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    if inplace:
        image = image.sub_(mean)
    else:
        image = image.sub(mean)
    return image.div_(std)


# torchvision/transforms/v2/functional/_color.py:66-84: RGB passes through; grayscale expansion not transcribed
def grayscale_to_rgb(inpt: torch.Tensor) -> torch.Tensor:
    if inpt.shape[-3] >= 3:
        return inpt
    raise NotImplementedError("grayscale_to_rgb of a grayscale tensor is not transcribed")


def _unavailable(*args, **kwargs):
    raise NotImplementedError("not transcribed from torchvision: transformers' video paths under test do not call it")


def _modules() -> dict[str, types.ModuleType]:
    """`torchvision` and the submodules transformers imports, holding the transcriptions above."""
    names = ["torchvision", "torchvision.io", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.transforms.v2", "torchvision.transforms.v2.functional"]
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        module.__file__ = __file__  # a namespace package (no __file__) would count as no torchvision
    modules["torchvision"].__version__ = "0.27.0"
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    modules["torchvision.transforms.functional"].pil_to_tensor = _unavailable
    functional = modules["torchvision.transforms.v2.functional"]
    for name, value in dict(InterpolationMode=InterpolationMode, resize=resize, normalize=normalize,
                            grayscale_to_rgb=grayscale_to_rgb).items():
        setattr(functional, name, value)
    return modules


def _availability_caches():
    from transformers.utils import import_utils

    return [import_utils.is_torchvision_available, import_utils.is_torchvision_v2_available,
            import_utils.is_torchvision_greater_or_equal]


def _interpolation_maps():
    """transformers' PIL resample -> torchvision mode map and its inverse (transformers/image_utils.py, the
    `if is_torchvision_available()` block), which its modules build only when torchvision is there at import."""
    from transformers.image_utils import PILImageResampling

    forward = {
        PILImageResampling.NEAREST: InterpolationMode.NEAREST_EXACT,
        PILImageResampling.BOX: InterpolationMode.BOX,
        PILImageResampling.BILINEAR: InterpolationMode.BILINEAR,
        PILImageResampling.HAMMING: InterpolationMode.HAMMING,
        PILImageResampling.BICUBIC: InterpolationMode.BICUBIC,
        PILImageResampling.LANCZOS: InterpolationMode.LANCZOS,
    }
    return forward, {v: k for k, v in forward.items()}


@contextlib.contextmanager
def fake_torchvision():
    """transformers as it runs with torchvision 0.27 installed, on the transcriptions above, inside the block.

    transformers asks `importlib.util.find_spec("torchvision")` (which answers from sys.modules when the name is
    there) behind lru-cached `is_torchvision_available()`, and reads the version from the module when no
    distribution is installed. Its modules imported without torchvision hold None or {} where torchvision's
    objects go (the interpolation maps, `tvF`, the auto package's video processor module): those are patched.
    Modules first imported inside the block (the video processors) are dropped after it, and sys.modules, the
    patched names and the caches are put back."""
    import pytest
    from transformers import image_processing_backends, image_processing_utils, image_utils, video_processing_utils
    from transformers.models import auto

    with pytest.MonkeyPatch.context() as patch:
        # the lazy `auto` package hands out a placeholder for it without torchvision; docstrings read it
        real = importlib.import_module("transformers.models.auto.video_processing_auto")
        patch.setattr(auto, "video_processing_auto", real, raising=False)
        for name, module in _modules().items():
            patch.setitem(sys.modules, name, module)
        forward, backward = _interpolation_maps()
        for module in (image_utils, image_processing_backends):
            patch.setattr(module, "pil_torch_interpolation_mapping", forward, raising=False)
            patch.setattr(module, "torch_pil_interpolation_mapping", backward, raising=False)
        for module in (image_processing_backends, image_processing_utils, video_processing_utils):
            patch.setattr(module, "tvF", sys.modules["torchvision.transforms.v2.functional"], raising=False)
        for cached in _availability_caches():
            cached.cache_clear()
        before = set(sys.modules)
        try:
            yield
        finally:
            for name in set(sys.modules) - before:
                parent, _, child = name.rpartition(".")
                sys.modules.pop(name)
                if parent in sys.modules:
                    vars(sys.modules[parent]).pop(child, None)
    for cached in _availability_caches():
        cached.cache_clear()
