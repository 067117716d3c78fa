"""Time to first token and decode speed: videoqa's loop against transformers' `generate`, same weights, same prompt.

    python benchmarks/decode.py --shape tiny --json
    python benchmarks/decode.py --shape 7b --device cuda --dtype float16 --json

    python benchmarks/decode.py --shape small --outputs --json

The prompt is a real video question (8 frames, 2074 tokens at 224 px, fewer for the tiny tower); both sides
decode greedily for --max-new-tokens without stopping at EOS, and must produce the same tokens.
On CUDA it also prints the achieved memory bandwidth: bytes of weights and KV cache read per step × steps/s.
--outputs also decodes, in the same run and in turn with the plain answer, with each per-step output asked for
(--logprobs 5, every layer's hidden states, attention weights on eager attention), to show what each costs and that
none costs anything when not asked for.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import shapes
from shapes import build, videos


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


OUTPUTS = {"off": {}, "logprobs 5": {"logprobs": 5}, "hidden states": {"hidden_states": True},
           "attentions (eager)": {"attentions": True}}


def ours(model, media, question: str, max_new: int, device: str, compile: bool,
         asked: dict | None = None) -> tuple[list[int], float, float]:
    """(tokens, time to first token, decode tokens/s) of one videoqa answer, vision included in the first token;
    `asked`: the per-step outputs asked for (Chat.tokens' keywords)."""
    model.compiled = compile
    start = time.perf_counter()
    chat = model.chat(media)
    tokens, first = [], 0.0
    for token in chat.tokens(question, max_new_tokens=max_new, **(asked or {})):
        if not tokens:
            sync(device)
            first = time.perf_counter() - start
            decode_start = time.perf_counter()
        tokens.append(token)
    sync(device)
    return tokens, first, (len(tokens) - 1) / (time.perf_counter() - decode_start)


def reference(model, media, question: str, max_new: int, device: str, compile: bool) -> tuple[list[int], float, float]:
    """The same through `generate`: first token from a 1-token call, decode speed from the full call's remainder."""
    from videoqa.prompt import prompt_ids

    net, tok, frames = model.net, model.tokenizer, media.frames
    positions = model.family.video.positions(net.config, len(frames.indices))
    ids = torch.tensor([prompt_ids(tok, model.preset.template, question, "<video>", positions)], device=device)
    timings = []
    for n in (1, max_new):
        sync(device)
        start = time.perf_counter()  # preprocessing timed on both sides
        pixels = torch.from_numpy(model.family.video.pixels(net.config, frames.pixels))[None]
        out = net.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels.to(device, net.dtype),
            do_sample=False, eos_token_id=None, max_new_tokens=n,
        )
        sync(device)
        timings.append(time.perf_counter() - start)
    return out[0, ids.shape[1] :].tolist(), timings[0], (max_new - 1) / (timings[1] - timings[0])


def outputs(model, media, question: str, args, compile: bool) -> dict:
    """Decode tokens/s with each per-step output asked for, the configurations in turn for each repeat (so a drift
    of the machine's speed falls on all alike), best of the repeats; and each one's ratio to "off"."""
    speeds: dict[str, list[float]] = {name: [] for name in OUTPUTS}
    for repeat in range(args.repeats + 1):
        for name, asked in OUTPUTS.items():
            speed = ours(model, media, question, args.max_new_tokens, args.device, compile, asked)[2]
            if repeat:  # the first round warms up
                speeds[name].append(speed)
    best = {name: max(found) for name, found in speeds.items()}
    return {name: {"decode_tokens_per_s": speed, "vs_off": speed / best["off"]} for name, speed in best.items()}


def main() -> None:
    parser = shapes.parser(__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="videoqa's compiled static-cache decode step [default: on CUDA only, as the CLI]")
    parser.add_argument("--outputs", action="store_true",
                        help="also decode with each per-step output asked for (logprobs, hidden states, attentions)")
    args = parser.parse_args()

    model = build(args.shape, args.device, getattr(torch, args.dtype))
    model.net.generation_config.eos_token_id = None  # both sides decode the full budget
    frames = model.media(videos()[0], 8)
    question = "Why is this video funny?"
    compile = args.device == "cuda" if args.compile is None else args.compile
    results = {}
    for name, run in (("videoqa", ours), ("transformers", reference)):
        # the first run warms up (and compiles) and is not counted
        runs = [run(model, frames, question, args.max_new_tokens, args.device, compile)
                for _ in range(args.repeats + 1)][1:]
        tokens = runs[0][0]
        results[name] = {"ttft_s": min(r[1] for r in runs), "decode_tokens_per_s": max(r[2] for r in runs),
                         "tokens": tokens}
    same = results["videoqa"].pop("tokens") == results["transformers"].pop("tokens")
    report = {
        "shape": args.shape, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "compiled": compile,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "same_tokens": same, **results,
        "decode_speedup": results["videoqa"]["decode_tokens_per_s"] / results["transformers"]["decode_tokens_per_s"],
    }
    if args.outputs:
        report["outputs"] = outputs(model, frames, question, args, compile)
    if args.device == "cuda":
        weights = sum(p.numel() * p.element_size() for p in model.net.model.language_model.parameters())
        weights += model.net.lm_head.weight.numel() * model.net.lm_head.weight.element_size()
        text = model.net.config.text_config
        kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size //
                                                                               text.num_attention_heads) * 2
        context = 2074 + args.max_new_tokens // 2
        step_bytes = weights + kv_per_token * context
        peak = {"H100": 3.35e12, "H200": 4.8e12}
        name = next((k for k in peak if k in report["device"]), None)
        achieved = step_bytes * results["videoqa"]["decode_tokens_per_s"]
        report["bandwidth_GBps"] = achieved / 1e9
        report["bandwidth_fraction_of_peak"] = achieved / peak[name] if name else None
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
