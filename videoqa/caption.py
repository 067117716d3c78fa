"""`videoqa caption`: one question over many videos, in batches, appending one whole record per video.

Frames of the next videos are decoded on background threads while the model works. Each record is one
`write` to a file opened for appending, so a crash or `kill -9` never leaves half a line, and `--resume`
skips every video the file already holds.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from videoqa.conversation import Settings, answer_batch, record
from videoqa.errors import Exit, VideoQAError
from videoqa.frames import Frames, read_frames
from videoqa.models import Model
from videoqa.render import Interrupt, progress_bar

FIELDS = ["video", "question", "prompt", "answer", "tokens", "frames", "model", "timings", "error"]


def find_videos(paths: list[Path], glob: str, recursive: bool) -> list[Path]:
    """Files as given; folders walked for names matching any of the comma-separated patterns."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)  # a missing or unreadable file gets an error record, like any broken video
            continue
        walk = path.rglob if recursive else path.glob
        found += sorted({f for pattern in glob.split(",") for f in walk(pattern.strip()) if f.is_file()})
    return list(dict.fromkeys(found))


class Output:
    """JSONL or CSV records, appended whole: one `os.write` each to an O_APPEND file (or lines on stdout).

    Checked when made, opened by `open()` once the model has loaded: a failed load leaves any old file untouched.
    """

    def __init__(self, path: Path | None, fmt: str, resume: bool, overwrite: bool):
        self.fmt, self.path, self.resume, self.overwrite = fmt, path, resume, overwrite
        self.done: set[str] = set()
        self.fd: int | None = None
        self.header = fmt == "csv"
        if path is None:
            if resume:
                raise VideoQAError("--resume needs --out: there is no file to continue on stdout")
        elif path.is_dir():
            raise VideoQAError(f"--out {path} is a directory")
        elif path.exists() and path.stat().st_size and not (resume or overwrite):
            raise VideoQAError(f"{path} exists: --resume to continue it, --overwrite to replace it")
        elif resume and path.exists():
            self.done = self._read_done(path)

    def _whole_lines(self, path: Path) -> bytes:
        data = path.read_bytes()
        return data[: data.rfind(b"\n") + 1]  # a trailing partial line (a crash mid-write elsewhere) is dropped

    def _read_done(self, path: Path) -> set[str]:
        """The videos the file already holds; anything but our own records is an error that names the line."""
        try:
            text = self._whole_lines(path).decode()
        except UnicodeDecodeError:
            raise VideoQAError(f"{path}: not a videoqa {self.fmt} file (not UTF-8); cannot resume it") from None
        if self.fmt == "csv":
            reader = csv.DictReader(io.StringIO(text))
            if text and reader.fieldnames != FIELDS:
                raise VideoQAError(f"{path}: its header is not videoqa's CSV header; cannot resume it")
            return {row["video"] for row in reader}
        done = set()
        for number, line in enumerate(text.splitlines(), 1):
            try:
                done.add(json.loads(line)["video"])
            except (ValueError, TypeError, KeyError):
                raise VideoQAError(f"{path}:{number}: not a videoqa record; cannot resume it") from None
        return done

    def open(self) -> None:
        if self.path is None:
            return
        try:
            if self.resume and self.path.exists():
                whole = len(self._whole_lines(self.path))
                if whole != self.path.stat().st_size:
                    os.truncate(self.path, whole)
            truncate = os.O_TRUNC if self.overwrite and not self.resume else 0
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | truncate, 0o644)
        except OSError as e:
            raise VideoQAError(f"--out {self.path}: cannot write it ({e.strerror})") from None
        self.header = self.fmt == "csv" and os.fstat(self.fd).st_size == 0

    def write(self, rec: dict) -> None:
        if self.fmt == "jsonl":
            line = json.dumps(rec, ensure_ascii=False) + "\n"
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, FIELDS, lineterminator="\n")
            if self.header:
                writer.writeheader()
                self.header = False
            flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in rec.items()}
            writer.writerow(flat)
            line = buffer.getvalue()
        if self.fd is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            os.write(self.fd, line.encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False
    start: float = field(default_factory=time.perf_counter)

    def exit_code(self) -> int:
        if self.interrupted:
            return Exit.INTERRUPTED
        if self.failed == 0:
            return Exit.OK
        return Exit.ALL_FAILED if self.done == 0 else Exit.SOME_FAILED


def prefetched(videos: list[Path], frames: int, ahead: int) -> Iterator[tuple[Path, Future]]:
    """(video, future of its frames) in order, with up to `ahead` videos decoding in the background."""
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="frames")
    futures: list[tuple[Path, Future]] = []
    try:
        for video in videos:
            futures.append((video, pool.submit(read_frames, video, frames)))
            if len(futures) > ahead:
                yield futures.pop(0)
        yield from futures
    finally:  # a stopped run does not wait for frames it will not use
        pool.shutdown(cancel_futures=True)


def batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def failure(model: Model, video: Path, question: str, error: VideoQAError) -> dict:
    """The record of a video that got no answer."""
    prompt = model.preset.template.format(media="<video>", question=question)
    return record(model, video, question, prompt, None, [], {}, error=str(error))


def caption_batch(model: Model, batch: list[tuple[Path, Future]], question: str, settings: Settings) -> list[dict]:
    """Records for a batch, in order: an error record for each video that cannot be read, answers for the rest."""
    prompt = model.preset.template.format(media="<video>", question=question)
    read: list[tuple[Path, Frames, float]] = []
    records: dict[Path, dict] = {}
    for video, future in batch:
        start = time.perf_counter()
        try:
            read.append((video, future.result(), time.perf_counter() - start))
        except VideoQAError as e:
            records[video] = failure(model, video, question, e)
    if read:
        answers, timings = answer_batch(model, [f for _, f, _ in read], [question] * len(read), settings)
        for (video, frames, waited), tokens in zip(read, answers):
            records[video] = record(model, video, question, prompt, frames, tokens, {"frames": waited, **timings})
    return [records[video] for video, _ in batch]


def run(model: Model, videos: list[Path], question: str, settings: Settings, output: Output, batch_size: int) -> Tally:
    """Caption every video not already in the output; stop cleanly after the batch in flight on Ctrl-C."""
    todo = [v for v in videos if str(v) not in output.done]
    tally = Tally(skipped=len(videos) - len(todo))
    with Interrupt() as interrupt, progress_bar(len(todo), "captioning") as advance:
        for batch in batches(prefetched(todo, settings.frames, ahead=2 * batch_size), batch_size):
            try:
                records = caption_batch(model, batch, question, settings)
            except VideoQAError as e:  # nothing in this batch can be answered, e.g. a prompt too long
                records = [failure(model, video, question, e) for video, _ in batch]
            for rec in records:
                output.write(rec)
                tally.failed += rec["error"] is not None
                tally.done += rec["error"] is None
            advance(len(batch))
            if interrupt.requested:
                tally.interrupted = True
                break
    return tally
