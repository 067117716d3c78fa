"""Many videos answered in batches: frames decoded and preprocessed ahead on background threads, each batch
prefilled and decoded together on the one decode path (left padding where prompts differ, per-row EOS, the
static cache), one record per video in order. No single video can stop the run: whatever fails for it becomes
its record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from videoqa import frames as framing
from videoqa import output
from videoqa.errors import VideoQAError
from videoqa.frames import Frames
from videoqa.session import ADVICE, Model
from videoqa.settings import Settings


@dataclass
class Ready:
    """A video and its question, with its frames decoded and preprocessed, or the reason they could not be."""

    video: Path
    question: str
    frames: Frames | None = None
    pixels: np.ndarray | None = None
    error: str | None = None
    waited: float = 0.0  # seconds the model waited for this video's frames


def prepare(model: Model, video: Path, question: str, count: int) -> Ready:
    """Decode and preprocess one video on a background thread (one decoder thread: two of these run beside the
    model's own); any failure is this video's alone."""
    try:
        frames = framing.read_frames(video, count, threads=1)
        return Ready(video, question, frames, model.family.video.pixels(model.net.config, frames.pixels))
    except VideoQAError as e:
        return Ready(video, question, error=str(e))
    except Exception as e:  # a bug shown on one record rather than the end of the run
        return Ready(video, question, error=f"internal error: {type(e).__name__}: {e}")


def prefetched(model: Model, jobs: list[tuple[Path, str]], frames: int, ahead: int) -> Iterator[Future]:
    """Futures of `prepare` in order, with up to `ahead` videos decoding in the background."""
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="frames")
    futures: list[Future] = []
    try:
        for video, question in jobs:
            futures.append(pool.submit(prepare, model, video, question, frames))
            if len(futures) > ahead:
                yield futures.pop(0)
        while futures:
            yield futures.pop(0)
    finally:  # cancel only what was never handed out: a partial last batch still holds its futures
        for future in futures:
            future.cancel()
        pool.shutdown(wait=False)


def batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prompt(model: Model, question: str) -> str:
    return model.preset.template.format(media=model.family.video_token, question=question)


def failure(model: Model, ready: Ready, error: str) -> dict:
    """The record of a video that got no answer."""
    return output.record(video=ready.video, question=ready.question, prompt=prompt(model, ready.question), answer="",
                         tokens=[], frames=[], model=model.name, runtime=model.runtime, timings={}, error=error)


def answer_batch(model: Model, ready: list[Ready], settings: Settings) -> tuple[list[list[int]], dict]:
    """Each video's tokens, up to and including its EOS, and the batch's timings. Greedy answers equal `ask`'s."""
    from videoqa.decode import static_cache
    from videoqa.prompt import prompt_ids

    start = time.perf_counter()
    video = model.family.video_token
    features = [model.family.video.features(model.net, r.pixels) for r in ready]  # each video's own positions
    rows = [prompt_ids(model.tokenizer, model.preset.template, r.question, video, f.shape[0])
            for r, f in zip(ready, features)]
    width = max(map(len, rows))
    model.check_fits(width)
    budget = min(settings.max_new_tokens, model.context - width)
    cache = static_cache(model.net.config.text_config, width + budget)
    vision = time.perf_counter() - start
    answers: list[list[int]] = [[] for _ in rows]
    eos, prefill = model.tokenizer.eos_token_id, 0.0
    for i, step in enumerate(model.generate(rows, torch.cat(features), video, cache, budget, settings)):
        if i == 0:
            prefill = time.perf_counter() - start - vision
        for answer, token in zip(answers, step.tolist()):
            if not answer or answer[-1] != eos:
                answer.append(token)
    decode = time.perf_counter() - start - vision - prefill
    return answers, {"vision": vision, "prefill": prefill, "decode": decode}


def answered(model: Model, ready: list[Ready], settings: Settings, stats: dict) -> list[dict]:
    """Records of videos answered together. Out of memory, the batch is answered in halves, down to one video
    (each back-off counted in `stats`); a batch that fails otherwise is answered one video at a time."""
    from videoqa.memory import is_oom

    try:
        answers, timings = answer_batch(model, ready, settings)
    except Exception as e:
        if len(ready) > 1 and (is_oom(e) or not isinstance(e, VideoQAError)):
            half = (len(ready) + 1) // 2 if is_oom(e) else 1
            stats["backoffs"] = stats.get("backoffs", 0) + is_oom(e)
            parts = [ready[i : i + half] for i in range(0, len(ready), half)]
            return [rec for part in parts for rec in answered(model, part, settings, stats)]
        reason = str(e) if isinstance(e, VideoQAError) else f"internal error: {type(e).__name__}: {e}"
        return [failure(model, r, f"out of memory: {ADVICE}" if is_oom(e) else reason) for r in ready]
    return [
        output.record(video=r.video, question=r.question, prompt=prompt(model, r.question), answer=model.decode(t),
                      tokens=t, frames=r.frames.listed(), model=model.name, runtime=model.runtime,
                      timings={"frames": r.waited, **timings})
        for r, t in zip(ready, answers)
    ]


def batch_records(model: Model, batch: list[Future], settings: Settings, stats: dict) -> list[dict]:
    """Records for a batch, in order: an error record for each video that cannot be read, answers for the rest."""
    ready: list[Ready] = []
    for future in batch:
        start = time.perf_counter()
        ready.append(future.result())
        ready[-1].waited = time.perf_counter() - start
    good = [r for r in ready if r.error is None]
    answers = iter(answered(model, good, settings, stats) if good else [])
    return [next(answers) if r.error is None else failure(model, r, r.error) for r in ready]


def records(model: Model, jobs: list[tuple[Path, str]], settings: Settings, batch_size: int,
            stop: Callable[[], bool], stats: dict) -> Iterator[dict]:
    """One record per (video, question), in order, a batch at a time; `stop()` is asked after each batch."""
    for batch in batches(prefetched(model, jobs, settings.frames, ahead=2 * batch_size), batch_size):
        yield from batch_records(model, batch, settings, stats)
        if stop():
            return
