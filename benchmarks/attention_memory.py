"""Memory of a prefill that returns attention weights: what SDPA takes, what eager attention takes without weights,
eager with every layer's weights kept (transformers' `output_attentions=True`), and videoqa's way (each layer hands
on the last query row alone, which is all an answer token's output keeps).

    python benchmarks/attention_memory.py --shape small --tokens 2074

Peak resident memory above the start of each prefill, sampled every millisecond by a thread (MB).
"""

from __future__ import annotations

import os
import threading
import time

import torch

import shapes
from videoqa.decode import Wanted, static_cache
from videoqa.traces import eager_attention


def resident() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak(run) -> float:
    """MB of resident memory above the start while `run()` runs."""
    highest, done = [0.0], threading.Event()

    def watch():
        while not done.is_set():
            highest[0] = max(highest[0], resident())
            time.sleep(0.001)

    base, watcher = resident(), threading.Thread(target=watch)
    watcher.start()
    run()
    done.set()
    watcher.join()
    return highest[0] - base


@torch.inference_mode()
def main() -> None:
    parser = shapes.parser(__doc__)
    parser.add_argument("--tokens", type=int, default=2074, help="prompt length (8 frames at 224 px: 2074)")
    args = parser.parse_args()
    model = shapes.build(args.shape, args.device, getattr(torch, args.dtype))
    net, body = model.net, model.lm.body
    embeds = torch.randn(1, args.tokens, net.config.text_config.hidden_size, dtype=net.dtype)

    def prefill(**outputs):
        return lambda: body(inputs_embeds=embeds, cache=static_cache(net.config.text_config, args.tokens),
                            use_cache=True, **outputs)

    found = {"sdpa": peak(prefill())}
    net.set_attn_implementation({"text_config": "eager"})
    found["eager, no weights"] = peak(prefill())
    found["eager, every layer's weights kept"] = peak(prefill(output_attentions=True))
    net.set_attn_implementation({"text_config": "sdpa"})
    with eager_attention(net, body, Wanted(attentions=True)):
        found["videoqa: the last query row kept"] = peak(prefill(output_attentions=True))
    for name, megabytes in found.items():
        print(f"{name:36} {megabytes:8.0f} MB")


if __name__ == "__main__":
    main()
