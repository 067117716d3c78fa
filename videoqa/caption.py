"""`videoqa caption` and `videoqa timeline`: records written to a file (records.py: whole entries appended, resumed)
as each batch is done.

The videos (or a video's segments) are answered by the API (`Model.caption`, `Model.timeline`, batch.py). A video is
known by its resolved path, so `clip.mp4` and `/videos/clip.mp4` are one video; a segment by its start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from videoqa.errors import Exit, VideoQAError
from videoqa.records import Output, identity, is_folder, record_key
from videoqa.render import STOP_SIGNALS, Interrupt, progress_bar
from videoqa.session import Model


def patterns(glob: str) -> list[str]:
    """The comma-separated --glob patterns; an empty or absolute one is a usage error."""
    found = [p.strip() for p in glob.split(",")]
    for pattern in found:
        if not pattern or Path(pattern).is_absolute() or pattern.startswith("~"):
            problem = "an empty pattern" if not pattern else f"{pattern!r} is not relative to the folder"
            raise VideoQAError(f"--glob {glob!r}: {problem}; give file name patterns such as '*.mp4,*.mkv'")
    return found


def find_videos(paths: list[Path], glob: str, recursive: bool) -> list[Path]:
    """Files as given; folders walked for names matching any of the patterns; each video once."""
    wanted = patterns(glob)
    found: list[Path] = []
    for path in paths:
        if not is_folder(path):
            found.append(path)  # a missing or unreadable file gets an error record, like any broken video
            continue
        walk = path.rglob if recursive else path.glob
        # every name that matches but a folder: a pipe or a dangling link gets its error record, as when named
        found += sorted({f for pattern in wanted for f in walk(pattern) if not is_folder(f)})
    unique: dict[str, Path] = {}
    for file in found:
        unique.setdefault(identity(file), file)  # the first spelling of each video
    return list(unique.values())


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    backoffs: int = 0  # batches answered in halves after running out of memory
    stopped: int = 0  # the exit code of the signal that stopped the run, 0 if none did
    start: float = field(default_factory=time.perf_counter)

    def exit_code(self) -> int:
        if self.stopped:
            return self.stopped
        if self.failed == 0:
            return Exit.OK
        return Exit.ALL_FAILED if self.done == 0 else Exit.SOME_FAILED


def run(model: Model, videos: list[Path], question: str, out: Output, batch_size: int, **settings) -> Tally:
    """Caption every video not already in the output (`settings` and the window, `start` and `end`, as
    `Model.caption` takes them)."""
    todo = [v for v in videos if record_key(v) not in out.done]
    return drain(lambda interrupted, stats: model.caption(todo, question, batch_size=batch_size,
                                                          interrupted=interrupted, stats=stats, **settings),
                 out, len(todo), skipped=len(videos) - len(todo), what="captioning")


def on_ray(checkpoint, jobs_of: Callable, *, address: str | None, debug: bool, batch_size: int, workers: int,
           finish: Callable[[int, dict], dict] = lambda n, rec: rec) -> Callable[[Callable[[], bool], dict],
                                                                                Iterator[dict]]:
    """`drain`'s records(interrupted, stats) for jobs answered on Ray Data (cluster.py: a local runtime, or the
    cluster at `address`), in the order they are done: the jobs and settings are `jobs_of(checkpoint)`, the
    checkpoint resolved here without its memory check (the memory is the workers'); each record made whole by
    `finish(job number, record)` (a segment's times, an item's judgement)."""
    from videoqa import cluster
    from videoqa.session import Checkpoint

    jobs, chosen = jobs_of(Checkpoint(**checkpoint.spec(check_memory=False)).resolve())

    def produced(interrupted: Callable[[], bool], stats: dict) -> Iterator[dict]:
        for n, rec in cluster.records(checkpoint, jobs, chosen, address=address, debug=debug, batch_size=batch_size,
                                      workers=workers, interrupted=interrupted):
            yield finish(n, rec)

    return produced


def run_on_ray(checkpoint, videos: list[Path], question: str, out: Output, batch_size: int, *, ray: dict,
               **settings) -> Tally:
    """`run` on Ray Data (`ray`: on_ray's address, debug and workers): the same records, in the order they are
    done."""
    from videoqa.session import caption_jobs

    todo = [v for v in videos if record_key(v) not in out.done]
    produced = on_ray(checkpoint, lambda here: caption_jobs(here, todo, question, **settings), batch_size=batch_size,
                      **ray)
    return drain(produced, out, len(todo), skipped=len(videos) - len(todo), what="captioning")


def start_key(rec: dict) -> float:
    """What a timeline's record is known by in its file, whatever the format: its segment's start, to the ms."""
    return round(float(rec["start"]), 3)


def drain(records: Callable[[Callable[[], bool], dict], Iterator[dict]], out: Output, total: int, *, skipped: int,
          what: str) -> Tally:
    """Write the records `records(interrupted, stats)` yields, with a progress bar of `total`; stop cleanly after the batch
    in flight on Ctrl-C, SIGTERM or SIGHUP. A reader of stdout that goes away stops the run quietly."""
    tally, stats = Tally(skipped=skipped), {}
    with Interrupt(STOP_SIGNALS) as interrupt, progress_bar(total, what) as advance:
        for rec in records(lambda: interrupt.requested, stats):
            out.write(rec)
            tally.failed += rec["error"] is not None
            tally.done += rec["error"] is None
            advance(1)
        tally.stopped, tally.backoffs = interrupt.code, stats.get("backoffs", 0)
    return tally
