"""Captioning throughput (videos/s) for batch sizes 1, 4 and 8 on a random-weight model.

    python benchmarks/caption.py --shape tiny            # CPU
    python benchmarks/caption.py --shape 7b --device cuda --dtype float16
    python benchmarks/caption.py --shape tiny --ray      # also on Ray Data (a local runtime), 1 and 2 workers

Every answer runs to --max-new-tokens (random weights rarely say EOS), so all batch sizes do the same work.
Frames are decoded on background threads, as `videoqa caption` does through the same `Model.caption`; the first
pass is a warm-up. `--ray`: the same videos through `--ray`'s path (cluster.records: a local runtime started, a CPU
stage, model actors) with 1 and 2 model workers, at the largest batch size: videos/s over the whole run (the
runtime's start and the actors' model loads included), the seconds to the first record, and videos/s after the
first batch's records (steady).
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
    parser.add_argument("--ray", action="store_true")
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
    on = on_ray(model, clips, args.max_new_tokens, max(results)) if args.ray else {}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    base = results[min(results)]
    print(json.dumps({"shape": args.shape, "device": device, "dtype": args.dtype, "videos": len(clips),
                      "max_new_tokens": args.max_new_tokens,
                      "videos_per_s": {str(k): round(v, 3) for k, v in results.items()},
                      "speedup_vs_batch_1": {str(k): round(v / base, 2) for k, v in results.items()},
                      **({"on_ray": on, "ray_vs_local": {k: round(v / results[max(results)], 2)
                                                         for k, v in on.items() if "first record" not in k and v}}
                         if on else {})}))


def on_ray(model, clips, max_new_tokens: int, batch_size: int) -> dict:
    """Videos/s through --ray's path with 1 and 2 model workers: whole, and steady (after the first record)."""
    from videoqa import cluster
    from videoqa.session import caption_jobs

    jobs, chosen = caption_jobs(model.checkpoint, clips, "Describe this video.", max_new_tokens=max_new_tokens)
    found = {}
    for workers in (1, 2):
        start, done = time.perf_counter(), []
        for _, rec in cluster.records(model.checkpoint, jobs, chosen, address=None, debug=False,
                                      batch_size=batch_size, workers=workers):
            done.append(time.perf_counter())
            assert rec["error"] is None, rec
        assert len(done) == len(jobs)
        later = [t for t in done if t > done[0] + 0.01]  # records after the first batch's
        found[f"ray, {workers} worker(s), whole run"] = round(len(jobs) / (done[-1] - start), 3)
        found[f"ray, {workers} worker(s), first record after (s)"] = round(done[0] - start, 2)
        found[f"ray, {workers} worker(s), steady"] = round(len(later) / (done[-1] - done[0]), 3) if later else None
    return found


if __name__ == "__main__":
    main()
