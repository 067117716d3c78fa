"""Captioning throughput (videos/s) for batch sizes 1, 4 and 8 on a random-weight model.

    python benchmarks/caption.py --shape tiny            # CPU
    python benchmarks/caption.py --shape 7b --device cuda --dtype float16

Every answer runs to --max-new-tokens (random weights rarely say EOS), so all batch sizes do the same work.
Frames are decoded on background threads, as `videoqa caption` does through the same `Model.caption`; the first
pass is a warm-up.
"""

from __future__ import annotations

import json
import time

import torch

import shapes
from shapes import build, videos


def main() -> None:
    parser = shapes.parser(__doc__)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,4,8")
    args = parser.parse_args()

    model = build(args.shape, args.device, getattr(torch, args.dtype))
    clips = [videos()[i % len(videos())] for i in range(args.videos)]
    results = {}
    for size in [int(s) for s in args.batch_sizes.split(",")]:
        for attempt in ("warm-up", "timed"):
            start = time.perf_counter()
            records = list(model.caption(clips, "Describe this video.", batch_size=size,
                                         max_new_tokens=args.max_new_tokens))
            seconds = time.perf_counter() - start
            assert all(r["error"] is None for r in records), records
        results[size] = len(clips) / seconds
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    base = results[min(results)]
    print(json.dumps({"shape": args.shape, "device": device, "dtype": args.dtype, "videos": len(clips),
                      "max_new_tokens": args.max_new_tokens,
                      "videos_per_s": {str(k): round(v, 3) for k, v in results.items()},
                      "speedup_vs_batch_1": {str(k): round(v / base, 2) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
