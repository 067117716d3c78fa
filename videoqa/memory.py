"""Memory: what a run will need (weights, KV cache, activations) against what its device has, known before a
single weight is read; and out-of-memory failures as one error with the stage and a way out.

Weights are counted from the safetensors headers (or, for a preset not downloaded yet, its `[memory]` table) at the
compute dtype, or at the quantized size for the language model's linear layers when they are quantized: on the CPU
(torchao) int8 is a byte a weight and two bfloat16 numbers per output row, int4 half a byte and a bfloat16 scale and
zero per group, and the LM head is quantized too; on CUDA (bitsandbytes) int8 is a byte a weight and a float32 scale
per row; nf4 4 bits a weight and a float32 absmax per block of 64.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from videoqa.errors import Exit, VideoQAError

GB = 1e9
MARGIN = 1.10  # allocator slack and the runtime's own buffers: stated, and checked by benchmarks/memory.py
NF4_BYTES = 0.5 + 4 / 64  # per weight, its block's absmax included
# On a CPU, bitsandbytes' nf4 keeps its weights repacked for the CPU kernel beside them (measured by
# benchmarks/memory.py at two shapes), and each library a runtime of its own.
CPU_NF4_EXTRA = 0.6  # per linear weight
# torch's int4 kernel for the CPU at a prefill: working buffers of about this many bytes per prompt position and
# unit of intermediate width (fitted to benchmarks/memory.py at two shapes: the peak was 0.79 of the estimate without
# them at the larger; once loaded, the process holds no more than the packed weights)
CPU_INT4_PREFILL = 16
CPU_QUANT_RUNTIME = {"int8": 30e6, "int4": 30e6, "nf4": 50e6}  # torchao: its modules and kernels once imported
TEXT = 64  # positions a question's own text and the template take, beside the placeholder's
# The runtime's own working memory beside the tensors counted here (allocator arenas, oneDNN workspaces): measured
# by benchmarks/memory.py on CPU; CUDA's figure is what torch allocates, so its context is not counted.
RUNTIME = {"cpu": 140e6, "cuda": 0.0, "mps": 0.0}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a checkpoint: its parameters by kind, and its dimensions."""

    vision: int  # towers, projector, newline: always in the compute dtype
    linear: int  # the language model's linear weights: what --quantize shrinks
    other: int  # embeddings, LM head, norms, biases
    rows: int  # output rows of those linear weights (one int8 scale each)
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    vision_layers: int
    vision_hidden: int


@dataclass(frozen=True)
class Estimate:
    weights: float  # bytes
    kv_cache: float
    activations: float

    @property
    def total(self) -> float:
        return (self.weights + self.kv_cache + self.activations) * MARGIN

    def __str__(self) -> str:
        unit, scale = ("GB", GB) if self.total >= GB else ("MB", 1e6)
        return (f"~{self.total / scale:.1f} {unit} (weights {self.weights / scale:.1f}, KV cache "
                f"{self.kv_cache / scale:.1f}, activations {self.activations / scale:.1f})")


def size(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= GB else f"{nbytes / 1e6:.1f} MB"


def estimate(shape: Shape, *, dtype_bytes: int, quantize: str, positions: int, new_tokens: int, batch: int,
             frames: int, tower_tokens: int, device_type: str = "cpu") -> Estimate:
    """A run of `batch` prompts of `positions` positions (`frames` frames of `tower_tokens` tokens each through the
    vision tower) answered with up to `new_tokens` tokens on a `device_type` device. Activations: the larger of
    the prefill's and the vision tower's working sets (every hidden layer of the tower is kept), plus the
    runtime's own."""
    from videoqa.decode import BUCKET

    linear = quantized(shape, quantize, device_type, dtype_bytes)
    weights = shape.vision * dtype_bytes + shape.other * dtype_bytes + linear
    length = -(-(positions + new_tokens) // BUCKET) * BUCKET  # the static cache's bucket
    kv = shape.layers * 2 * shape.kv_heads * shape.head_dim * dtype_bytes * length * batch
    prefill = batch * positions * (3 * shape.intermediate + 4 * shape.hidden) * dtype_bytes + batch * shape.vocab * 4
    if quantize == "int8" and device_type == "cpu":  # one weight at a time cast to the compute dtype: a bfloat16
        # prefill's layers; in float32 torchao's own linear casts every weight, the LM head's too, on every call
        prefill += (shape.intermediate if dtype_bytes == 2 else max(shape.intermediate, shape.vocab)) * shape.hidden \
            * dtype_bytes
    if quantize == "int4" and device_type == "cpu":
        prefill += batch * positions * shape.intermediate * CPU_INT4_PREFILL
    vision = frames * batch * tower_tokens * shape.vision_hidden * (shape.vision_layers + 1) * dtype_bytes
    runtime = RUNTIME.get(device_type, 0.0) + (CPU_QUANT_RUNTIME.get(quantize, 0.0) if device_type == "cpu" else 0.0)

    return Estimate(weights, kv, max(prefill, vision) + runtime)


def quantized(shape: Shape, quantize: str, device_type: str, dtype_bytes: int) -> float:
    """Bytes of the language model's linear layers under `quantize`, and, where torchao quantizes the LM head, the
    head's quantized copy less the float head it replaces (a tied head's float matrix stays: the embeddings)."""
    from videoqa.quantization import group_for

    if quantize == "none":
        return shape.linear * dtype_bytes
    if quantize == "nf4":
        return shape.linear * (NF4_BYTES + (CPU_NF4_EXTRA if device_type == "cpu" else 0.0))
    if device_type != "cpu":  # bitsandbytes' int8: a float32 scale per row
        return shape.linear + shape.rows * 4
    head = shape.vocab * shape.hidden
    tied = shape.other < 2 * head  # the embeddings' matrix is the head's
    if quantize == "int8":
        per_weight, per_row = 1.0, 4  # the int8 weight; a bfloat16 scale and a unit per row
    else:
        # a scale and a zero per group, in the compute dtype
        per_weight, per_row = 0.5 + 2 * dtype_bytes / group_for(shape.hidden, shape.intermediate), 0
    return ((shape.linear + head) * per_weight + (shape.rows + shape.vocab) * per_row
            - (0 if tied else head * dtype_bytes))


def from_table(table: dict[str, int], *, images: Sequence[bool], frames: int, new_tokens: int, **run) -> Estimate:
    """The estimate for a preset not downloaded yet, from its `[memory]` table, for a question about files that
    are `images` (True) or videos: each video an 8-frame question's positions and tower work scaled to `frames`,
    each image the largest image's; their positions add up, the tower's work is the largest file's. `run`:
    estimate()'s other keywords."""
    video_positions = table_frames(table, frames)[0]
    table = dict(table)
    positions, tokens, tiles = (table.pop(key) for key in ("positions", "tower_tokens", "tower_frames"))
    context = table.pop("context", None)  # None: no cap (the check after download caps with the config's)
    image_positions, image_tiles = table.pop("image_positions", positions), table.pop("image_tiles", tiles)
    # an image-only preset's positions are its largest image's
    parts = [(image_positions, image_tiles) if image else (video_positions, frames) for image in images]
    positions, tiles = sum(p for p, _ in parts) + TEXT, max(t for _, t in parts)
    cap = new_tokens if context is None else min(new_tokens, max(context - positions, 0))
    return estimate(Shape(**table), positions=positions, frames=tiles, tower_tokens=tokens, new_tokens=cap, **run)


def table_frames(table: dict[str, int], frames: int) -> tuple[int, int | None]:
    """From a video preset's table: the positions `frames` frames take (its 8-frame figure scaled), and the most
    frames whose video leaves a position free in its context (None: the table gives no context)."""
    per_frame = table["positions"] / table["tower_frames"]
    most = int((table["context"] - 1) / per_frame) if "context" in table else None
    return round(frames * per_frame), most


def header(file: Path) -> dict[str, list[int]]:
    """A safetensors file's tensor names and shapes, from its header, without reading any tensor; a header that
    cannot be read is a model error, as it is when the weights are loaded."""
    try:
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= file.stat().st_size - 8:
                raise ValueError(f"a header of {length} bytes")
            found = json.loads(f.read(length))
        return {name: [int(n) for n in info["shape"]] for name, info in found.items() if name != "__metadata__"}
    except OSError as e:
        raise VideoQAError(f"{file}: cannot read it ({e.strerror})", Exit.MODEL) from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise VideoQAError(f"{file}: weights are truncated or corrupt ({type(e).__name__}); download the model again",
                           Exit.MODEL) from None


def counts(path: Path, vision_modules: tuple[str, ...]) -> tuple[int, int, int, int]:
    """(vision, linear, other, rows) parameter counts of a checkpoint, from its safetensors headers. A tensor is
    vision if its name is under one of the family's vision modules (hub files may lack the `model.` prefix), and
    linear if it is another 2-D weight of a layer (the language model's, whatever the file calls it:
    `model.language_model.layers.*`, `language_model.model.layers.*`, Qwen2.5-VL's `model.layers.*`)."""
    vision_names = tuple(m.removeprefix("model.") for m in vision_modules)
    totals = [0, 0, 0, 0]
    for file in sorted(path.glob("*.safetensors")):
        for name, shape in header(file).items():
            size = math.prod(shape)
            bare = name.removeprefix("model.")
            if bare.startswith(vision_names):
                totals[0] += size
            elif len(shape) == 2 and ".layers." in name:
                totals[1] += size
                totals[3] += shape[0]
            else:
                totals[2] += size
    return tuple(totals)


def shape_of(path: Path, config, vision_modules: tuple[str, ...]) -> Shape:
    """The Shape of a checkpoint on disk: counts from its headers, dimensions from its config."""
    text, vision = config.text_config, config.vision_config
    heads = text.num_attention_heads
    return Shape(
        *counts(path, vision_modules), layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, hidden=text.hidden_size,
        intermediate=text.intermediate_size, vocab=text.vocab_size, vision_layers=vision.num_hidden_layers,
        vision_hidden=vision.hidden_size,
    )


def free(device) -> tuple[float, str]:
    """Bytes the device can give this run now, and its name: free memory on CUDA, available RAM on CPU, the
    recommended working set less what is allocated on MPS."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return float(torch.cuda.mem_get_info(index)[0]), f"cuda:{index}"
    if device.type == "mps":
        return float(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()), "mps"
    return available_ram(), "this machine's RAM"


def room(device, max_memory: float | None) -> tuple[float, str]:
    """Bytes a run may use on `device`, and what they are: its free memory, or `max_memory` below it."""
    have, where = free(device)
    if max_memory is not None and max_memory < have:
        return max_memory, f"--max-memory allows {size(max_memory)}"
    return have, f"{where} has {size(have)} free"


def available_ram() -> float:
    """MemAvailable on Linux (free memory plus what the kernel can reclaim); elsewhere the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            return float(next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError):
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> float:
    """`6GB`, `6 GiB`, `6000MB`, `6.5g` -> bytes; anything else is a usage error."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise VideoQAError(f"--max-memory {text!r}: give a size such as 6GB, 6GiB or 6000MB")
    return float(match.group(1)) * UNITS[unit]


ADVICE = "try --quantize nf4, fewer --frames, a smaller --batch-size, or -m llava-onevision-0.5b"  # after an OOM
OOM = ("out of memory", "can't allocate memory", "not enough memory", "allocation failed", "failed to allocate")


def is_oom(error: BaseException) -> bool:
    """torch's OutOfMemoryError, Python's MemoryError, or an allocator's failure surfacing as a RuntimeError."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error).lower() for words in OOM)


@contextmanager
def stage(name: str, advice: str) -> Iterator[None]:
    """Out of memory in this stage becomes one error with exit code 8 that names the stage and a way out."""
    try:
        yield
    except BaseException as e:
        if not is_oom(e):
            raise
        raise OutOfMemory(f"out of memory during {name}: {advice}") from None


class OutOfMemory(VideoQAError):
    def __init__(self, message: str):
        super().__init__(message, Exit.MEMORY)
