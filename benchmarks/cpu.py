"""CPU speed at every precision against this machine's limits, measured in the same run, and llama.cpp beside it.

    python benchmarks/cpu.py                                     # LLaVA-OneVision-0.5B's shape, all precisions
    python benchmarks/cpu.py --preset smolvlm2-256m --no-llamacpp
    python benchmarks/cpu.py --precisions bfloat16,int8 --json

A random-weight checkpoint with the preset's real dimensions, its vision tower included (SigLIP-so400m at 384 px for
OneVision, SigLIP-base at 512 px for SmolVLM2: benchmarks/families.py builds the language model), is asked one
question about `--frames` frames of a real video, with exactly `--tokens` new tokens (EOS off), once per precision,
each in a fresh process after a warm-up answer: float32, bfloat16 (where this CPU computes it natively), int8,
int4 (torchao on the CPU) and nf4 (bitsandbytes).

Each stage against its limit, measured by this script in the same run before the models:
- the vision tower and the prefill: FLOPs counted by torch's FlopCounterMode, over the time, against the GEMM rate
  of the compute dtype (torch's matmul at the prefill's shape; quantized runs compute in bfloat16);
- decode: bytes read per token (the language model's weights as held, the LM head included, and the KV cache)
  times tokens/s, against the read bandwidth (a sum over 1 GiB) and against torch's GEMV rate for the same
  format over 48 layers of 4864 x 896 (F.linear for float32 and bfloat16, `_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`): the fastest the same kernels go alone.
llama.cpp (`llama-cpp-python` built here from its source package: benchmarks/llamacpp.py) runs the same random
Qwen2 text weights (OneVision's language model) converted to GGUF in f16, q8_0 and q4_0: prompt tokens/s for the
same prompt length and decode tokens/s, with the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import families  # noqa: E402

TOWERS = {  # the real towers' dimensions (hub configs)
    "llava-onevision-0.5b": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                 num_attention_heads=16, image_size=384, patch_size=14),
    "smolvlm2-256m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}
PRECISIONS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("auto", "int8"),
              "int4": ("auto", "int4"), "nf4": ("auto", "nf4")}


def best(run, repeats: int = 5) -> float:
    """The shortest of `repeats` timed calls, after one untimed."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def limits(prompt: int) -> dict:
    """This machine's GEMM rates (GFLOP/s), read bandwidth and GEMV rates (GB/s of the format's bytes)."""
    n, k = 4864, 896
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(prompt, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        found[f"gemm_gflops_{str(dtype)[6:]}"] = 2 * prompt * n * k / best(lambda: F.linear(x, w)) / 1e9
    found["read_gb_s"] = read_bandwidth()
    weights = [torch.randn(n, k) * 0.02 for _ in range(48)]
    for name, (run, nbytes) in gemv_kernels(weights).items():
        found[f"gemv_gb_s_{name}"] = nbytes / best(run, 3) / 1e9
    return found


def read_bandwidth() -> float:
    """GB/s a sum over 1 GiB of float32 reads (torch's own reduction, this process's threads)."""
    big = torch.ones(2**28)
    return big.numel() * 4 / best(lambda: big.sum()) / 1e9


def gemv_kernels(weights: list[torch.Tensor]) -> dict:
    """Per format: (one pass of a (1, K) activation through every weight, the bytes that pass reads)."""
    n, k = weights[0].shape
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        held = [w.to(dtype) for w in weights]
        x = torch.randn(1, k, dtype=dtype)
        out[str(dtype)[6:]] = (lambda held=held, x=x: [F.linear(x, w) for w in held], len(held) * n * k * (4 if dtype == torch.float32 else 2))
    x = torch.randn(1, k, dtype=torch.bfloat16)
    scales = [(w.abs().amax(1) / 127) for w in weights]
    int8 = [(torch.round(w / s[:, None]).to(torch.int8), s.to(torch.bfloat16)) for w, s in zip(weights, scales)]
    out["int8"] = (lambda: [torch.ops.aten._weight_int8pack_mm(x, q, s) for q, s in int8], len(int8) * n * k)
    group = 128
    int4 = []
    for w in weights:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        int4.append((packed, torch.rand(k // group, n, 2, dtype=torch.bfloat16)))
    out["int4"] = (lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, group, sz) for p, sz in int4],
                   len(int4) * (n * k // 2 + n * k // group * 4))
    return out


@torch.inference_mode()
def candidates(layers: int = 16) -> dict:
    """GB/s of weight bytes each candidate int8 path reads for a one-row product, over `layers` layers of
    4864 x 896 (out of cache), bfloat16 activations unless named: what the choice of kernels rests on."""
    import bitsandbytes as bnb
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    n, k = 4864, 896
    weights = [torch.randn(n, k) * 0.02 for _ in range(layers)]
    x = torch.randn(1, k, dtype=torch.bfloat16)
    torchao = []
    for w in weights:
        linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        linear.weight.data.copy_(w)
        quantize_(linear, Int8WeightOnlyConfig())
        torchao.append(linear)
    compiled = torch.compile(lambda x, w: F.linear(x, w.qdata.to(x.dtype)) * w.scale.flatten().to(x.dtype))
    bits = []
    for w in weights:
        linear = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
        linear.weight = bnb.nn.Int8Params(w.to(torch.bfloat16), requires_grad=False, has_fp16_weights=False)
        bits.append(linear.to("cpu"))
    scales = [w.abs().amax(1) / 127 for w in weights]
    int8 = [(torch.round(w / s[:, None]).to(torch.int8), s) for w, s in zip(weights, scales)]
    x32 = x.float()
    runs = {
        "torchao Int8Tensor linear (eager)": lambda: [m(x) for m in torchao],
        "torchao Int8Tensor, dequantize+linear compiled by inductor": lambda: [compiled(x, m.weight) for m in torchao],
        "bitsandbytes Linear8bitLt": lambda: [m(x) for m in bits],
        "_weight_int8pack_mm, float32 activations": lambda: [torch.ops.aten._weight_int8pack_mm(x32, q, s)
                                                             for q, s in int8],
        "_weight_int8pack_mm, bfloat16 activations": lambda: [torch.ops.aten._weight_int8pack_mm(x, q, s.to(x.dtype))
                                                              for q, s in int8],
    }
    return {name: layers * n * k / best(run, 3) / 1e9 for name, run in runs.items()}


CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from torch.utils.flop_counter import FlopCounterMode
import families, videoqa
folder, dtype, quantize, frames, tokens = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
families.no_eos()
model = videoqa.load(folder, device="cpu", dtype=dtype, quantize=quantize, cache=False)
media = model.media(str(families.VIDEO), frames)
def held(module):
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        parts = [getattr(t, n) for n in getattr(t, "tensor_data_names", [])] or [t]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total
lm = model.family.language_model(model.net)
answer = families.ours(model, media, tokens)  # warm-up
answer = families.ours(model, media, tokens)
counts = {}
if quantize == "none":
    with FlopCounterMode(display=False) as tower:
        model.features(str(families.VIDEO), frames=frames)
    with FlopCounterMode(display=False) as first:
        model.chat(media).ask(families.QUESTION, max_new_tokens=1)
    counts = {"tower_flops": tower.get_total_flops(), "prefill_flops": first.get_total_flops() - tower.get_total_flops()}
text = model.net.config.text_config
kv_heads = getattr(text, "num_key_value_heads", text.num_attention_heads)
head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
kv = 2 * text.num_hidden_layers * kv_heads * head_dim * model.net.dtype.itemsize * (answer["prompt_tokens"] + tokens // 2)
print(json.dumps({**answer, **counts, "weights_read": held(lm.body.layers) + held(lm.head), "kv_read": kv,
                  "dtype": str(model.net.dtype)[6:], "threads": torch.get_num_threads()}))
"""


def answer(folder: Path, precision: str, frames: int, tokens: int) -> dict:
    dtype, quantize = PRECISIONS[precision]
    done = subprocess.run([sys.executable, "-c", CHILD, str(HERE), str(folder), dtype, quantize, str(frames),
                           str(tokens)], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    found = json.loads(done.stdout.strip().splitlines()[-1])
    found["distinct_tokens"] = len(set(found.pop("tokens")))
    return found


def shares(run: dict, flops: dict, machine: dict) -> dict:
    """Each stage's rate and its share of the limit."""
    gemm = machine[f"gemm_gflops_{'float32' if run['dtype'] == 'float32' else 'bfloat16'}"]
    tower = flops["tower_flops"] / run["vision_s"] / 1e9
    prefill = flops["prefill_flops"] / run["lm_prefill_s"] / 1e9
    read = (run["weights_read"] + run["kv_read"]) * run["decode_tokens_per_s"] / 1e9
    return {"tower_gflops": tower, "tower_share": tower / gemm, "prefill_gflops": prefill,
            "prefill_share": prefill / gemm, "decode_gb_s": read, "decode_share_of_bus": read / machine["read_gb_s"]}


def llamacpp(folder: Path, prompt: int, tokens: int, threads: int) -> dict:
    """llama.cpp on OneVision's language model (the same random weights) in f16, q8_0 and q4_0."""
    import llamacpp as lcpp
    from safetensors.torch import load_file
    from transformers import AutoConfig

    state = {}
    for file in sorted(folder.glob("*.safetensors")):  # save_pretrained writes the legacy names
        for name, tensor in load_file(file).items():
            for prefix, now in (("language_model.model.", "model."), ("model.language_model.", "model."),
                                ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
                if name.startswith(prefix):
                    state[now + name.removeprefix(prefix)] = tensor.float()
    config = AutoConfig.from_pretrained(folder).text_config
    config.tie_word_embeddings = "lm_head.weight" not in state  # the composite config says it, not the text one
    found = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        for kind in ("f16", "q8_0", "q4_0"):
            path = lcpp.write_gguf(state, config, Path(scratch) / f"{kind}.gguf", kind)
            found[kind] = lcpp.measure(path, prompt_tokens=prompt, new_tokens=tokens, threads=threads)
            path.unlink()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava-onevision-0.5b", choices=list(TOWERS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--llamacpp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--candidates", action="store_true", help="only the int8 kernels' one-row rates")
    parser.add_argument("--checkpoint", type=Path, help="build the checkpoint here and keep it (reused if present)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from videoqa.models import cpu_has_bf16, cpu_threads

    torch.set_num_threads(cpu_threads())
    if args.candidates:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_flags(), "gb_s": candidates()}, indent=2))
        return
    folder = args.checkpoint or Path(tempfile.mkdtemp(prefix="cpu-bench-", dir="/tmp"))
    try:
        if not (folder / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            families.build(args.preset, folder, torch.float32, None, TOWERS[args.preset])
        runs = {p: answer(folder, p, args.frames, args.tokens) for p in args.precisions.split(",")
                if p != "bfloat16" or cpu_has_bf16()}
        prompt = next(r["prompt_tokens"] for r in runs.values() if "prompt_tokens" in r)
        machine = limits(prompt)
        flops = next((r for r in runs.values() if "tower_flops" in r), None)
        if flops is None:
            raise SystemExit("the shares need an unquantized precision's FLOP counts: add float32 or bfloat16")
        for run in runs.values():
            if "error" not in run:
                run.update(shares(run, flops, machine))
        report = {"preset": args.preset, "frames": args.frames, "new_tokens": args.tokens, "prompt_tokens": prompt,
                  "date": time.strftime("%Y-%m-%d"), "cpu": cpu_flags(), "threads": cpu_threads(),
                  "machine": machine, "videoqa": runs}
        print(json.dumps(report), file=sys.stderr, flush=True)  # kept if llama.cpp fails
        if args.llamacpp and args.preset == "llava-onevision-0.5b":
            report["llama.cpp"] = llamacpp(folder, prompt, args.tokens, cpu_threads())
    finally:
        if not args.checkpoint:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report, indent=None if args.json else 2))


def cpu_flags() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    words = set(text.split())
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return {"model": model, "cores": os.cpu_count(),
            "flags": sorted(words & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "avx_vnni", "fma"})}


if __name__ == "__main__":
    main()
