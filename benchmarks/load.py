"""Peak host memory while videoqa loads a checkpoint, against the size of its weights.

    python benchmarks/load.py --shape small --dtype bfloat16            # CPU
    python benchmarks/load.py --shape 7b --device cuda --dtype float16

Saves a random checkpoint of the shape in float32, then, in a fresh process, loads it with videoqa's loader
(`from_pretrained(device_map=...)`) into the target device and dtype and reports the growth of the process's
peak resident memory. On CUDA the weights never sit in host memory whole; on CPU they are the destination,
so the fair figure there is the peak against the weights in the *target* dtype.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time, torch, transformers, videoqa
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
model = videoqa.load(sys.argv[1], device=sys.argv[2], dtype=sys.argv[3], cache=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in model.net.parameters())
print(weights, (peak - before) * 1024, seconds)
"""


def main() -> None:
    import torch

    from shapes import parser, save

    args = parser(__doc__).parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        save(args.shape, Path(tmp), torch.float32)
        file_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, args.device, args.dtype], capture_output=True,
                             text=True, check=True).stdout.split()
    weights, peak_growth, seconds = int(out[0]), int(out[1]), float(out[2])
    print(json.dumps({"shape": args.shape, "device": args.device, "dtype": args.dtype,
                      "file_MB": round(file_bytes / 2**20, 1), "weights_in_target_dtype_MB": round(weights / 2**20, 1),
                      "peak_host_growth_MB": round(peak_growth / 2**20, 1),
                      "peak_over_target_weights": round(peak_growth / weights, 2), "load_s": round(seconds, 2)}))


if __name__ == "__main__":
    main()
