"""Loading, quantized: the language model's linear layers (its LM head included) in fewer bytes, each read by a
kernel that reads only those bytes.

Which library quantizes what, and why (figures: benchmarks/README.md, "CPU speed"):
- CPU, int8 and int4: torchao's weight-only configs through transformers' `TorchAoConfig`, so the weights are
  the ones transformers makes of the checkpoint: int8 per output row (`Int8WeightOnlyConfig`), int4 asymmetric in
  groups along the input (`PrototypeInt4WeightOnlyConfig`, whose tensor calls torch's `_weight_int4pack_mm_for_cpu`).
  torchao's int8 linear casts the whole weight to the activations' dtype on every call (a copy per layer per token:
  slower than not quantizing), so each int8 layer here reads its int8 weight through torch's `_weight_int8pack_mm`
  for the few rows of a decode step, in the same two roundings as torchao's (the dot product, then its scale).
  Both kernels are fast with bfloat16 activations only, so `--dtype auto` computes in bfloat16 when quantizing.
- CUDA, int8: bitsandbytes' LLM.int8; nf4 everywhere: bitsandbytes' 4-bit NormalFloat. int4 runs on the CPU only.
The vision side (towers, projector) stays in the compute dtype, so visual features and the feature cache are the
same as without quantization. A tied LM head (the input embeddings' matrix) is quantized as a copy of its own under
torchao, the embeddings staying as they are: it is a quarter of a 0.5B model's bytes read per token.
"""

from __future__ import annotations

from typing import Any

import torch

from videoqa.errors import Exit, VideoQAError
from videoqa.families import Family

GROUPS = (128, 64, 32)  # int4 group sizes, the largest that divides every quantized layer's input first
DECODE_ROWS = 16  # up to this many activation rows (a decode step's batch) go through _weight_int8pack_mm


def library(quantize: str, device_type: str) -> str | None:
    """The library that quantizes `quantize` on a `device_type` device (None: no quantization); a combination
    that has none is refused."""
    if quantize == "none":
        return None
    if device_type == "mps":
        raise VideoQAError(f"--quantize {quantize}: neither torchao nor bitsandbytes runs on MPS; use --device cpu, "
                           "or no --quantize", Exit.DEVICE)
    if quantize == "int4" and device_type != "cpu":
        raise VideoQAError("--quantize int4 runs on the CPU (torch's int4 kernel for it); on CUDA use --quantize nf4",
                           Exit.DEVICE)
    return "torchao" if device_type == "cpu" and quantize in ("int8", "int4") else "bitsandbytes"


def available(name: str) -> bool:
    """Whether the library is installed, without importing it (both print notes on import)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name] is not None  # None: an import that failed, or was blocked
    return importlib.util.find_spec(name) is not None


def group_for(*widths: int) -> int:
    """int4's group: the largest of 128, 64 and 32 that divides every input width of the language model's linear
    layers (SmolVLM2's 576 and 960 are not multiples of 128)."""
    for group in GROUPS:
        if all(width % group == 0 for width in widths):
            return group
    raise VideoQAError(f"--quantize int4: the language model's widths {widths} are not multiples of 32; "
                       "use --quantize int8", Exit.MODEL)


def group_size(text_config) -> int:
    """int4's group for this language model; its layers' output widths must be multiples of 16 (torch's int4
    packing for the CPU), as every real checkpoint's are."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    outputs = (text_config.hidden_size, text_config.intermediate_size, heads * head_dim, kv_heads * head_dim,
               text_config.vocab_size)
    if any(width % 16 for width in outputs):
        raise VideoQAError(f"--quantize int4: the language model's output widths {outputs} are not all multiples "
                           "of 16; use --quantize int8", Exit.MODEL)
    return group_for(text_config.hidden_size, text_config.intermediate_size, heads * head_dim)


def torchao_config(quantize: str, text_config) -> Any:
    """torchao's config for `quantize` (int8 or int4), as transformers' TorchAoConfig takes it (the load has
    silenced torchao's import notes: models.quiet_transformers)."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as e:  # an older torchao
        raise VideoQAError(f"--quantize {quantize} needs torchao 0.18 or later ({e}): pip install 'videoqa[quant]'",
                           Exit.MODEL) from None
    if quantize == "int8":
        return Int8WeightOnlyConfig()
    return PrototypeInt4WeightOnlyConfig(group_size=group_size(text_config))


def config(found: Family, quantize: str, device, dtype, text_config) -> Any:
    """transformers' quantization config for `quantize` on `device` (None for none): the language model's linear
    layers; the vision side (full module paths) in the compute dtype."""
    name = library(quantize, device.type)
    if name is None:
        return None
    if not available(name):
        raise VideoQAError(f"--quantize {quantize} needs {name}: pip install 'videoqa[quant]'", Exit.MODEL)
    skip = list(found.vision_modules)
    if name == "torchao":
        from transformers import TorchAoConfig

        return TorchAoConfig(torchao_config(quantize, text_config), modules_to_not_convert=skip)
    from transformers import BitsAndBytesConfig

    skip.append("lm_head")
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


def finish(net, quantize: str, text_config) -> None:
    """After a torchao load: the LM head quantized like the layers if the load left it tied to the embeddings, and,
    in bfloat16, each layer a plain module that calls its kernel (float32 keeps torchao's own tensors: their
    results are transformers' with the same config)."""
    quantize_head(net, torchao_config(quantize, text_config))
    if net.dtype == torch.bfloat16:
        plain_modules(net)
    give_back_freed_memory()


def plain_modules(net) -> None:
    """Each torchao linear as a plain module that calls its kernel."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int8Tensor

    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and isinstance(child.weight, (Int8Tensor, Int4OpaqueTensor)):
                setattr(parent, name, (Int8Linear if isinstance(child.weight, Int8Tensor) else Int4Linear)(child))


def give_back_freed_memory() -> None:
    """The float weights quantized at load are freed, but glibc keeps the freed pages in the process (measured: half
    a GB held at a 2048-wide model); hand them back to the system."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def quantize_head(net, torchao: Any) -> None:
    """Quantize an LM head that is still the embeddings' matrix as an untied copy (a head of its own was quantized
    by the load)."""
    from torchao.quantization import quantize_

    head = net.lm_head
    if type(head.weight) is not torch.nn.Parameter:  # quantized by the load
        return
    copy = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    copy.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    copy.bias = head.bias
    quantize_(copy, torchao)
    net.lm_head = copy


class Int8Linear(torch.nn.Module):
    """A torchao int8 linear's weight and scales, read without its copy of the weight in the activations' dtype: at
    a decode step `_weight_int8pack_mm` with unit scales reads the int8 weight itself; torchao's two roundings are
    kept (the dot product in the activations' dtype, then times the row scales). The sums' order is the kernel's:
    at one row equal to torchao's in the tests' shapes; at 2-16 rows (a batch) a few outputs in 10^4 differ in the
    last bit."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight
        if weight.act_quant_kwargs is not None or weight.act_pre_scale is not None or weight.block_size[-1] != \
                weight.shape[1]:
            raise ValueError("not a per-row weight-only int8 tensor")  # what Int8WeightOnlyConfig makes
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("qdata", weight.qdata)
        self.register_buffer("scale", weight.scale.flatten().to(torch.bfloat16))
        self.register_buffer("unit", torch.ones_like(self.scale))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= DECODE_ROWS:
            dot = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.qdata, self.unit)
        else:  # a prefill's GEMM: faster from the weight cast to bfloat16 than through the GEMV kernel (measured)
            dot = torch.mm(flat, self.qdata.t().to(x.dtype))
        y = (dot * self.scale).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(torch.nn.Module):
    """A torchao int4 linear's packed weight, scales and zeros, given to `_weight_int4pack_mm_for_cpu` as torchao's
    Int4OpaqueTensor gives them, without its tensor subclass's Python dispatch on every call (a third of a 0.5B
    model's decode step here: benchmarks/README.md)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight
        self.out_features, self.in_features = weight.shape
        self.group = weight.block_size[1]
        self.register_buffer("qdata", weight.qdata)
        self.register_buffer("scale_and_zero", weight.scale_and_zero)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qdata, self.group, self.scale_and_zero)
        y = y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
