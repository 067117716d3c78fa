"""`videoqa caption`: folders to a file of records, one whole record per video, appended as each batch is done.

The videos are answered by the API (`Model.caption`, batch.py). Each record is one `write` to a file opened for
appending, so a crash or `kill -9` never leaves half a line, and `--resume` skips every video the file already
holds. A video is known by its resolved path, so `clip.mp4` and `/videos/clip.mp4` are one video.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from videoqa.errors import Exit, VideoQAError
from videoqa.output import FIELDS, FORMATS, display, split_lines, write
from videoqa.render import STOP_SIGNALS, Interrupt, progress_bar
from videoqa.session import Model


def identity(path: Path | str) -> str:
    """What makes two spellings of a path one video: the absolute path with links resolved, as text."""
    return display(Path(os.path.abspath(path)).resolve())


def patterns(glob: str) -> list[str]:
    """The comma-separated --glob patterns; an empty or absolute one is a usage error."""
    found = [p.strip() for p in glob.split(",")]
    for pattern in found:
        if not pattern or Path(pattern).is_absolute() or pattern.startswith("~"):
            problem = "an empty pattern" if not pattern else f"{pattern!r} is not relative to the folder"
            raise VideoQAError(f"--glob {glob!r}: {problem}; give file name patterns such as '*.mp4,*.mkv'")
    return found


def is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, a loop of links: not a folder; its record will say what is wrong
        return False


def find_videos(paths: list[Path], glob: str, recursive: bool) -> list[Path]:
    """Files as given; folders walked for names matching any of the patterns; each video once."""
    wanted = patterns(glob)
    found: list[Path] = []
    for path in paths:
        if not is_folder(path):
            found.append(path)  # a missing or unreadable file gets an error record, like any broken video
            continue
        walk = path.rglob if recursive else path.glob
        found += sorted({f for pattern in wanted for f in walk(pattern) if f.is_file()})
    unique: dict[str, Path] = {}
    for file in found:
        unique.setdefault(identity(file), file)  # the first spelling of each video
    return list(unique.values())


class Output:
    """JSONL or CSV records, appended whole: one `os.write` each to an O_APPEND file (or lines on stdout).

    Checked when made, opened by `open()` once the model has loaded: a failed load leaves any old file untouched.
    """

    def __init__(self, path: Path | None, fmt: str, *, resume: bool, overwrite: bool, inputs: list[Path]):
        path = None if path is not None and str(path) == "-" else path  # `--out -`: stdout, as most tools
        self.fmt, self.path, self.resume, self.overwrite = fmt, path, resume, overwrite
        self.done: set[str] = set()
        self.fd: int | None = None
        self.header = fmt == "csv"
        if path is None:
            if resume:
                raise VideoQAError("--resume needs --out: there is no file to continue on stdout")
            return
        if identity(path) in {identity(v) for v in inputs}:
            raise VideoQAError(f"--out {display(path)} is one of the videos to caption; give another file")
        if is_folder(path):
            raise VideoQAError(f"--out {display(path)} is a directory")
        if self._size(path) and not (resume or overwrite):
            raise VideoQAError(f"{display(path)} exists: --resume to continue it, --overwrite to replace it")
        if resume and self._size(path) is not None:
            self.done = self._read_done(path)

    @staticmethod
    def _size(path: Path) -> int | None:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise VideoQAError(f"--out {display(path)}: {e.strerror}") from None

    def _whole_lines(self, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise VideoQAError(f"--out {display(path)}: cannot read it to resume ({e.strerror})") from None
        return data[: data.rfind(b"\n") + 1]  # a trailing partial line (a crash mid-write elsewhere) is dropped

    def _read_done(self, path: Path) -> set[str]:
        """The videos the file already holds; anything but our own records is an error that names the line."""
        try:
            text = self._whole_lines(path).decode()
        except UnicodeDecodeError:
            raise VideoQAError(f"{display(path)}: not a videoqa {self.fmt} file (not UTF-8); cannot resume it") from None
        if self.fmt == "csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if text and reader.fieldnames != FIELDS:
                raise VideoQAError(f"{display(path)}: its header is not videoqa's CSV header; cannot resume it")
            return {identity(row["video"]) for row in reader}
        done = set()
        for number, line in enumerate(split_lines(text), 1):
            try:
                done.add(identity(json.loads(line)["video"]))
            except (ValueError, TypeError, KeyError):
                raise VideoQAError(f"{display(path)}:{number}: not a videoqa record; cannot resume it") from None
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
            self.header = self.fmt == "csv" and os.fstat(self.fd).st_size == 0
        except OSError as e:
            raise VideoQAError(f"--out {display(self.path)}: cannot write it ({e.strerror})") from None

    def write(self, rec: dict) -> None:
        line = FORMATS[self.fmt](rec, self.header)
        self.header = False
        if self.fd is None:
            write(line)
            return
        try:
            os.write(self.fd, line.encode())
        except OSError as e:
            raise VideoQAError(f"--out {display(self.path)}: cannot write it ({e.strerror})") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


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
    """Caption every video not already in the output; stop cleanly after the batch in flight on Ctrl-C, SIGTERM
    or SIGHUP. A reader of stdout that goes away stops the run quietly."""
    todo = [v for v in videos if identity(v) not in out.done]
    tally = Tally(skipped=len(videos) - len(todo))
    with Interrupt(STOP_SIGNALS) as interrupt, progress_bar(len(todo), "captioning") as advance:
        stop, stats = (lambda: interrupt.requested), {}
        for rec in model.caption(todo, question, batch_size=batch_size, stop=stop, stats=stats, **settings):
            out.write(rec)
            tally.failed += rec["error"] is not None
            tally.done += rec["error"] is None
            advance(1)
        tally.stopped, tally.backoffs = interrupt.code, stats.get("backoffs", 0)
    return tally
