"""`videoqa serve` under load: requests/s and latency at 1, 4 and 8 concurrent clients, batching on and off, and
time to first token of a follow-up against a first question.

    python benchmarks/serve.py --shape tiny           # CPU
    python benchmarks/serve.py --shape small --requests 16

A random checkpoint of the shape is saved, and `videoqa serve` runs on it in its own process (once with
`--batch-size 1`, once with the default 4) with the feature cache in a fresh directory; the clients are threads
of this process using the official `openai` client. Each request opens a new conversation about a real video
(8 frames, `--max-tokens` new tokens, greedy) with its own question; every level runs once as a warm-up first.
Latency is from sending to the last byte; the follow-up figure streams a second turn of the same conversation
(its KV cache kept: only the new turn is prefilled) against its first turn.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import shapes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(folder: Path, batch: int, args, cache: Path) -> tuple[subprocess.Popen, str]:
    """`videoqa serve` on the checkpoint, in its own process, once it answers /health: the process, its URL."""
    port = free_port()
    command = [sys.executable, "-m", "videoqa", "serve", "-m", str(folder), "--port", str(port), "--allow",
               str(shapes.ASSETS), "--device", args.device, "--dtype", args.dtype, "-b", str(batch)]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "VIDEOQA_LOG": "0", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(base + "/health"):
                return server, base + "/v1"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("videoqa serve did not start")


def ask(client, video: Path, question: str, max_tokens: int) -> float:
    """One new conversation's answer: seconds from sending to the whole reply."""
    start = time.perf_counter()
    client.chat.completions.create(model="m", max_tokens=max_tokens, extra_body={"frames": 8}, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                     {"type": "text", "text": question}]}])
    return time.perf_counter() - start


def level(client, clients: int, requests: int, max_tokens: int, tag: str) -> dict:
    """`requests` new conversations spread over `clients` threads: requests/s and latency percentiles."""
    clips, latencies = shapes.videos(), []
    work = [(clips[i % len(clips)], f"Question {tag} {i}: what happens in this video?") for i in range(requests)]
    lock = threading.Lock()

    def run(mine):
        for video, question in mine:
            seconds = ask(client, video, question, max_tokens)
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=run, args=(work[n::clients],)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"requests_per_s": round(len(latencies) / wall, 3), "p50_s": round(statistics.median(ordered), 3),
            "p95_s": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 3)}


def first_token(client, messages: list, max_tokens: int) -> tuple[float, str]:
    """Seconds to the first streamed text of an answer, and the whole answer."""
    start, first, text = time.perf_counter(), None, []
    for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, stream=True,
                                                extra_body={"frames": 8}):
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            first = first or time.perf_counter() - start
            text.append(piece)
    return first, "".join(text)


def follow_ups(client, max_tokens: int, count: int = 5) -> dict:
    """Median time to first token of a first question (frames, tower, whole prompt) and of its follow-up."""
    firsts, seconds = [], []
    for n, video in enumerate((shapes.videos() * count)[:count]):
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                                 {"type": "text", "text": f"Follow-up {n}: what is this?"}]}]
        took, answer = first_token(client, messages, max_tokens)
        firsts.append(took)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        seconds.append(first_token(client, messages, max_tokens)[0])
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {"first_question_s": round(first, 4), "follow_up_s": round(second, 4),
            "follow_up_vs_first": round(second / first, 3)}


def main() -> None:
    import openai
    import torch

    parser = shapes.parser(__doc__)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    folder = shapes.save(args.shape, Path(tempfile.mkdtemp()))
    results = {}
    for batch in (1, 4):
        server, base = serve(folder, batch, args, Path(tempfile.mkdtemp()))
        try:
            client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=3600)
            for clients in (1, 4, 8):
                level(client, clients, args.requests, args.max_tokens, f"warm-up {clients}")
                results[f"batch {batch}, {clients} clients"] = level(client, clients, args.requests,
                                                                     args.max_tokens, f"timed {clients}")
            if batch == 4:
                results["time to first token"] = follow_ups(client, args.max_tokens)
        finally:
            server.terminate()
            server.wait()
    for clients in (1, 4, 8):
        on, off = results[f"batch 4, {clients} clients"], results[f"batch 1, {clients} clients"]
        on["vs_batch_1"] = round(on["requests_per_s"] / off["requests_per_s"], 2)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({"shape": args.shape, "device": device, "dtype": args.dtype, "requests": args.requests,
                      "max_tokens": args.max_tokens, **results}, indent=1))


if __name__ == "__main__":
    main()
