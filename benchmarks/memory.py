"""Memory and speed at each precision: videoqa's estimate before loading against the measured peak, with load
time, prefill time and decode speed, for one 8-frame question.

    python benchmarks/memory.py --shape small                       # CPU: float32, bfloat16, int8, int4, nf4
    python benchmarks/memory.py --shape 7b --device cuda            # CUDA: float16, bfloat16, int8, nf4

Each precision runs in a fresh process. The measured peak is, on CPU, the peak resident memory (VmHWM) of the answer
over the process's resident memory before loading: the peak is reset once the weights are loaded, so the load's
passing use of the checkpoint file's pages (page cache, which the kernel reclaims under pressure) is reported apart,
as `load_peak`. On CUDA it is `torch.cuda.max_memory_allocated`. The estimate is `Checkpoint.estimate` for the
same question (8 frames, --max-new-tokens), made before any weight is read.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time, torch, transformers, videoqa
from videoqa.session import Checkpoint
folder, video, device, dtype, quantize, new = sys.argv[1:7]
new = int(new)
def rss(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")
found = Checkpoint(folder, device=device, dtype=dtype, quantize=quantize, cache=False, check_memory=False)
estimate = found.estimate(max_new_tokens=new)
reset_peak()
before = rss("VmRSS")
start = time.perf_counter()
model = found.load()
load = time.perf_counter() - start
load_peak = rss("VmHWM") - before
reset_peak()
answer = model.ask(video, "Why is this video funny?", max_new_tokens=new)
peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss("VmHWM") - before
print(json.dumps({"estimate_bytes": estimate.total, "estimate": str(estimate), "peak_bytes": peak,
                  "load_peak_bytes": load_peak, "load_s": load,
                  "prefill_s": answer.timings["prefill"], "decode_tokens_per_s": answer.timings["decode_tokens_per_s"],
                  "tokens": len(answer.tokens)}))
"""


def main() -> None:
    import torch

    from shapes import parser, save, videos

    cli = parser(__doc__)
    cli.add_argument("--max-new-tokens", type=int, default=32)
    args = cli.parse_args()
    first = "float32" if args.device == "cpu" else "float16"
    quantized = "bfloat16" if args.device == "cpu" else "float16"
    runs = [(first, "none"), ("bfloat16", "none"), (quantized, "int8"), *([(quantized, "int4")] if args.device == "cpu"
                                                                          else []), (quantized, "nf4")]
    with tempfile.TemporaryDirectory() as tmp:
        save(args.shape, Path(tmp), torch.float16 if args.shape == "7b" else torch.float32)
        for dtype, quantize in runs:
            video = next(v for v in videos() if v.name == "videollava_sample_demo_1.mp4")
            command = [sys.executable, "-c", CHILD, tmp, str(video), args.device, dtype, quantize,
                       str(args.max_new_tokens)]
            out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            out["estimate_over_peak"] = round(out["estimate_bytes"] / out["peak_bytes"], 3)
            print(json.dumps({"shape": args.shape, "device": args.device, "dtype": dtype, "quantize": quantize,
                              **{k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}}))


if __name__ == "__main__":
    main()
