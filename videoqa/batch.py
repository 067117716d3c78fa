"""Many videos (or windows of one video) answered in batches: frames decoded and preprocessed ahead on background
threads, each batch prefilled and decoded together on the one decode path (left padding where prompts differ,
per-row EOS, the static cache), one record per job in order. No single job can stop the run: whatever fails for it
becomes its record. The same batches, prefilled only, give `find`'s yes/no scores.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from videoqa import output
from videoqa.errors import VideoQAError
from videoqa.frames import Frames, Sampler
from videoqa.engine import Engine
from videoqa.memory import ADVICE
from videoqa.settings import Settings
from videoqa.windows import WHOLE, Window

log = logging.getLogger("videoqa")


@dataclass(frozen=True)
class Job:
    """A video, or a window of one, and the question asked about it (multiple choice when `choices` are given)."""

    video: Path
    question: str
    window: Window = WHOLE
    choices: tuple[str, ...] | None = None


@dataclass
class Ready:
    """A job with its frames decoded and preprocessed, or the reason they could not be."""

    job: Job
    frames: Frames | None = None
    pixels: np.ndarray | None = None
    error: str | None = None
    waited: float = 0.0  # seconds the model waited for this job's frames


Read = Callable[[Job], Frames]  # a job's frames, read on a background thread


def prepare(pixels: Callable[[np.ndarray], np.ndarray], job: Job, read: Read) -> Ready:
    """Decode one job's frames and preprocess them (`pixels`: the family's, for its config) on a background thread
    or a worker of a cluster; any failure is this job's alone."""
    try:
        frames = read(job)
        return Ready(job, frames, pixels(frames.pixels))
    except VideoQAError as e:
        return Ready(job, error=str(e))
    except Exception as e:  # a bug shown on one record rather than the end of the run
        return Ready(job, error=f"internal error: {type(e).__name__}: {e}")


def prefetched(model: Engine, jobs: list[Job], read: Read, ahead: int, workers: int) -> Iterator[Future]:
    """Futures of `prepare` in order, with up to `ahead` jobs decoding on `workers` background threads."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frames")
    pixels = functools.partial(model.family.video.pixels, model.net.config)
    futures: list[Future] = []
    try:
        for job in jobs:
            futures.append(pool.submit(prepare, pixels, job, read))
            if len(futures) > ahead:
                yield futures.pop(0)
        while futures:
            yield futures.pop(0)
    finally:  # cancel only what was never handed out: a partial last batch still holds its futures
        for future in futures:
            future.cancel()
        pool.shutdown(wait=False)


def batches(items: Iterable, size: int) -> Iterator[list]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise VideoQAError(f"batch size {size!r}: give a whole number from 1")
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def ready_batches(model: Engine, jobs: list[Job], read: Read, batch_size: int, workers: int) -> Iterator[list[Ready]]:
    """The jobs prepared, a batch at a time, in order; each job's wait for its frames timed, and each warning about
    a video said once (a damaged video's segments share theirs)."""
    said: set[tuple[Path, str]] = set()
    for batch in batches(prefetched(model, jobs, read, 2 * batch_size, workers), batch_size):
        ready: list[Ready] = []
        for future in batch:
            start = time.perf_counter()
            ready.append(future.result())
            ready[-1].waited = time.perf_counter() - start
            for warning in ready[-1].frames.warnings if ready[-1].frames else []:
                if (ready[-1].job.video, warning) not in said:
                    said.add((ready[-1].job.video, warning))
                    log.warning(f"{output.display(ready[-1].job.video)}: {warning}")
        yield ready


def prompt(model: Engine, question: str) -> str:
    return model.preset.template.format(media=model.family.video_token, question=question)


def failure(model: Engine, ready: Ready, error: str) -> dict:
    """The record of a job that got no answer."""
    job = ready.job
    return output.record(video=job.video, question=job.question, prompt=prompt(model, job.question), answer="",
                         tokens=[], frames=[], model=model.name, runtime=model.runtime, timings={}, error=error)


def rows(model: Engine, ready: list[Ready]) -> tuple[list[list[int]], list]:
    """Each job's prompt ids (its placeholder expanded by the family) and its features (a features.Visual), in
    order."""
    visuals = [model.video_features(r.pixels, r.frames.times) for r in ready]
    ids = [model.turn_ids(model.preset.template, r.job.question, [v]) for r, v in zip(ready, visuals)]
    return ids, visuals


def answer_batch(model: Engine, ready: list[Ready], settings: Settings) -> tuple[list[list[int]], dict, list[str],
                                                                               list]:
    """Each job's tokens, up to and including its EOS, the batch's timings, its warnings (the context cut the
    answers' length) and each job's log-probabilities (None unless asked for). Greedy answers equal `ask`'s."""
    from videoqa.decode import static_cache
    from videoqa.traces import Trace

    start = time.perf_counter()
    ids, visuals = rows(model, ready)
    width = max(map(len, ids))
    model.check_fits(width)
    budget, cut = model.budget(settings.max_new_tokens, width)
    cache = static_cache(model.net.config.text_config, width + budget)
    vision = time.perf_counter() - start
    answers: list[list[int]] = [[] for _ in ids]
    eos, prefill, trace = model.tokenizer.eos_token_id, 0.0, Trace(logprobs=settings.logprobs)
    steps = model.generate(ids, visuals, cache, budget, settings, trace.wanted)
    ended = [False] * len(ids)  # by EOS or a stop string
    for i, step in enumerate(steps):
        if i == 0:
            prefill = time.perf_counter() - start - vision
        trace.add(step)
        for row, (answer, token) in enumerate(zip(answers, step.token.tolist())):
            if not ended[row]:
                answer.append(token)
                ended[row] = token == eos or model.stopped(answer, settings.stop)
        if all(ended):
            steps.close()
            break
    decode = time.perf_counter() - start - vision - prefill
    logprobs = [trace.logprobs(model.tokenizer, row, answer, row_ids[-1])
                for row, (answer, row_ids) in enumerate(zip(answers, ids))]
    return answers, {"vision": vision, "prefill": prefill, "decode": decode}, cut, logprobs


def answered(model: Engine, ready: list[Ready], settings: Settings, stats: dict) -> list[dict]:
    """Records of jobs answered together. Out of memory, the batch is answered in halves, down to one job (each
    back-off counted in `stats`); a batch that fails otherwise is answered one job at a time."""
    from videoqa.memory import is_oom

    try:
        answers, timings, cut, logprobs = answer_batch(model, ready, settings)
    except Exception as e:
        if len(ready) > 1 and (is_oom(e) or not isinstance(e, VideoQAError)):
            half = (len(ready) + 1) // 2 if is_oom(e) else 1
            stats["backoffs"] = stats.get("backoffs", 0) + is_oom(e)
            parts = [ready[i : i + half] for i in range(0, len(ready), half)]
            return [rec for part in parts for rec in answered(model, part, settings, stats)]
        reason = str(e) if isinstance(e, VideoQAError) else f"internal error: {type(e).__name__}: {e}"
        return [failure(model, r, f"out of memory: {ADVICE}" if is_oom(e) else reason) for r in ready]
    found = [
        output.record(video=r.job.video, question=r.job.question, prompt=prompt(model, r.job.question),
                      answer=model.decode(t, settings.stop), tokens=t, frames=r.frames.listed(), model=model.name,
                      runtime=model.runtime, timings={"frames": r.waited, **timings},
                      warnings=[*r.frames.warnings, *cut])
        for r, t in zip(ready, answers)
    ]
    return found if settings.logprobs is None else [{**rec, "logprobs": lp} for rec, lp in zip(found, logprobs)]


def chosen(model: Engine, ready: Ready) -> dict:
    """The record of a multiple-choice job: its options scored after its prompt, prefilled once (as `ask
    --choices`); the answer is the best option."""
    from videoqa.decode import static_cache

    start = time.perf_counter()
    (ids,), visuals = rows(model, [ready])
    job, text = ready.job, prompt(model, ready.job.question)
    scored, best = model.choose(ids, visuals, text, job.choices,
                                lambda length: static_cache(model.net.config.text_config, length))
    rec = output.record(video=job.video, question=job.question, prompt=text, answer=best["text"],
                        tokens=best["tokens"], frames=ready.frames.listed(), model=model.name, runtime=model.runtime,
                        timings={"frames": ready.waited, "prefill": time.perf_counter() - start},
                        warnings=ready.frames.warnings)
    return {**rec, "choices": scored}


def scored_or_failed(model: Engine, ready: Ready) -> dict:
    """`chosen`, or the job's error record: no job stops the run."""
    from videoqa.memory import is_oom

    try:
        return chosen(model, ready)
    except Exception as e:
        reason = str(e) if isinstance(e, VideoQAError) else f"internal error: {type(e).__name__}: {e}"
        return failure(model, ready, f"out of memory: {ADVICE}" if is_oom(e) else reason)


def batch_records(model: Engine, ready: list[Ready], settings: Settings, stats: dict) -> list[dict]:
    """Records for a batch, in order: an error record for each job whose frames cannot be read, the multiple-choice
    jobs scored one by one, answers for the rest (generated together)."""
    generating = [r for r in ready if r.error is None and r.job.choices is None]
    answers = iter(answered(model, generating, settings, stats) if generating else [])
    return [failure(model, r, r.error) if r.error is not None else next(answers) if r.job.choices is None else
            scored_or_failed(model, r) for r in ready]


def records(model: Engine, jobs: list[Job], settings: Settings, batch_size: int, stop: Callable[[], bool],
            stats: dict, *, read: Read | None = None, workers: int = 2) -> Iterator[dict]:
    """One record per job, in order, a batch at a time; `stop()` is asked after each batch; out-of-memory back-offs
    are counted in `stats`. `read`: how a job's frames are read (by default each video opened on its own, one
    decoder thread each, `workers` at once)."""
    read = read or (lambda job: read_frames_of(job, functools.partial(model.checkpoint.sampler, settings)))
    for ready in ready_batches(model, jobs, read, batch_size, workers):
        yield from batch_records(model, ready, settings, stats)
        if stop():
            return


def read_frames_of(job: Job, sampler: Sampler) -> Frames:
    from videoqa.frames import open_video

    with open_video(job.video, threads=1) as video:
        return video.sample(sampler(video.size), job.window)


def score_batch(model: Engine, ready: list[Ready]) -> list[float]:
    """P(yes) / (P(yes) + P(no)) for the token after each job's prompt: one batched prefill, no decoding. Computed
    as sigmoid(logit(yes) - logit(no)), which is that ratio of the softmax without the rest of the vocabulary."""
    ids, visuals = rows(model, ready)
    model.check_fits(max(map(len, ids)))
    logits = model.next_logits(ids, visuals)  # (B, V) float32
    yes, no = model.answer_ids
    return torch.sigmoid(logits[:, yes] - logits[:, no]).tolist()


def scores(model: Engine, jobs: list[Job], read: Read, batch_size: int, workers: int) -> Iterator[dict]:
    """{"start", "end", "score", "frames", "warnings", "error"} per job, in order; `score` None where it failed."""
    for ready in ready_batches(model, jobs, read, batch_size, workers):
        good = [r for r in ready if r.error is None]
        try:
            values, reason = score_batch(model, good) if good else [], None
        except VideoQAError as e:  # e.g. prompts too long: no job of the batch can be scored
            values, reason = [None] * len(good), str(e)
        scored = iter(values)
        for r in ready:
            yield {"start": r.job.window.start, "end": r.job.window.end,
                   "score": next(scored) if r.error is None else None, "frames": r.frames.listed() if r.frames else [],
                   "warnings": r.frames.warnings if r.frames else [], "error": r.error or reason}
