"""A file of records that only grows: whole entries appended as they are done, and resumed after a crash.

Each entry is one `write` to a file opened for appending, so a crash or `kill -9` never leaves half an entry, and
`--resume` skips what the file already holds (a record is known by a key: caption's by the video, a timeline's by
the segment's start) after dropping a half entry another writer may have left. The format (JSONL, CSV, SRT,
WebVTT, Markdown: `output.FORMS`) says how an entry is written, where it ends and how it is read back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from pathlib import Path

from videoqa.errors import VideoQAError
from videoqa.output import FORMS, Foreign, display, write


def identity(path: Path | str) -> str:
    """What makes two spellings of a path one file: the absolute path with links resolved (a loop of links stays as
    it is: opening it says what is wrong). Bytes that are not UTF-8 are kept: two names differing only in them are
    two files."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a loop of links, in Python 3.11
        return str(absolute)


def record_key(path: Path | str) -> str:
    """What --resume knows a video by: its identity as a record writes it (bytes that are not UTF-8 become U+FFFD
    in the record, so two names differing only in them are one to --resume)."""
    return display(identity(path))


def one_of(path: Path, inputs: list[Path]) -> bool:
    """Whether `path` is one of the `inputs`, by any spelling or link, hard links included."""
    if identity(path) in {identity(v) for v in inputs}:
        return True
    try:
        here = path.stat()
    except OSError:
        return False
    for video in inputs:
        try:
            if os.path.samestat(here, video.stat()):
                return True
        except OSError:
            continue
    return False


def is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, a loop of links: not a folder; its record will say what is wrong
        return False


class Output:
    """Records appended whole to `path` in format `fmt` (or written to stdout when `path` is None or "-").

    Checked when made (the keys of the records it holds already are `done`), opened by `open()` once the model
    has loaded: a failed load leaves any old file untouched.
    """

    def __init__(self, path: Path | None, fmt: str, *, resume: bool, overwrite: bool, inputs: list[Path],
                 key: Callable[[dict], Hashable]):
        path = None if path is not None and str(path) == "-" else path  # `--out -`: stdout, as most tools
        self.fmt, self.form, self.path, self.resume, self.overwrite = fmt, FORMS[fmt], path, resume, overwrite
        self.done: set = set()
        self.fd: int | None = None
        self.count = 0  # entries in the file: the next one's number is count + 1
        if path is None:
            if resume:
                raise VideoQAError("--resume needs --out: there is no file to continue on stdout")
            return
        if one_of(path, inputs):
            raise VideoQAError(f"--out {display(path)} is one of the videos; give another file")
        if is_folder(path):
            raise VideoQAError(f"--out {display(path)} is a directory")
        if self._size(path) and not (resume or overwrite):
            raise VideoQAError(f"{display(path)} exists: --resume to continue it, --overwrite to replace it")
        if resume and self._size(path) is not None:
            self.done, self.count = self._read_done(path, key)

    @staticmethod
    def _size(path: Path) -> int | None:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise VideoQAError(f"--out {display(path)}: {e.strerror}") from None

    def _whole_entries(self, path: Path) -> tuple[bytes, bytes]:
        """(the file's whole entries, what follows them: an entry left half-written, to be dropped)."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise VideoQAError(f"--out {display(path)}: cannot read it to resume ({e.strerror})") from None
        end = self.form.end.encode()
        whole = data.rfind(end) + len(end) if end in data else 0
        return data[:whole], data[whole:]

    def _read_done(self, path: Path, key: Callable[[dict], Hashable]) -> tuple[set, int]:
        """The keys of the records the file holds, and their count; anything but our own records is an error, and
        so is an unfinished last entry that does not begin as ours would (it is not ours to drop)."""
        whole, rest = self._whole_entries(path)
        try:
            entries = self.form.read(whole.decode())
            if not self.form.could_begin(rest.decode(errors="replace"), len(entries) + 1):
                raise Foreign(f"not a videoqa {self.fmt} file (its end is no {self.fmt} entry of videoqa's)")
        except UnicodeDecodeError:
            raise VideoQAError(f"{display(path)}: not a videoqa {self.fmt} file (not UTF-8); cannot resume it") from None
        except Foreign as e:
            raise VideoQAError(f"{display(path)}: {e}; cannot resume it") from None
        done = set()
        for number, entry in enumerate(entries, 1):
            try:
                done.add(key(entry))
            except (ValueError, TypeError, KeyError):
                raise VideoQAError(f"{display(path)}:{number}: not a videoqa record; cannot resume it") from None
        return done, len(entries)

    def open(self) -> None:
        if self.path is None:
            return
        try:
            if self.resume and self.path.exists():
                whole, rest = self._whole_entries(self.path)
                if rest:
                    os.truncate(self.path, len(whole))
            truncate = os.O_TRUNC if self.overwrite and not self.resume else 0
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | truncate, 0o644)
            if os.fstat(self.fd).st_size == 0:
                self.count = 0  # an empty file: the next entry carries the header again
        except OSError as e:
            raise VideoQAError(f"--out {display(self.path)}: cannot write it ({e.strerror})") from None

    def write(self, rec: dict) -> None:
        self.count += 1
        entry = self.form.entry(rec, self.count)
        if self.fd is None:
            write(entry)
            return
        try:
            os.write(self.fd, entry.encode())
        except OSError as e:
            raise VideoQAError(f"--out {display(self.path)}: cannot write it ({e.strerror})") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
