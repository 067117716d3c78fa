"""What goes to stdout or an output file: the one record schema, its JSON / JSONL / CSV / Markdown forms, a
timeline's SRT, WebVTT and Markdown forms, and the answer streamed as plain text.

stdout failures are decided here once: a reader that went away (a closed pipe) ends the run quietly, any
other failure to write (a full disk, a closed stdout) is a one-line error with exit code 2.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from videoqa.errors import VideoQAError
from videoqa.names import display

FIELDS = ["video", "question", "prompt", "answer", "tokens", "frames", "model", "runtime", "timings", "warnings",
          "error"]


class OutputClosed(Exception):
    """stdout's reader went away (`| head -1`): stop quietly, as `cat` does."""


class Unwritable(VideoQAError):
    """stdout cannot be written (closed, a full disk): nothing more can be shown, so even a chat stops."""


def check_stdout() -> None:
    """Before any slow work, for commands that answer on stdout: one started with stdout closed (`>&-`) fails now."""
    if sys.stdout is None:
        raise Unwritable("cannot write to stdout: it is closed")


def write(text: str) -> None:
    """Write to stdout at once (answers stream, records are seen as they are done)."""
    check_stdout()
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None
    except OSError as e:
        raise Unwritable(f"cannot write to stdout ({e.strerror or e})") from None


def record(
    *, video: Path | str | None, question: str, prompt: str, answer: str, tokens: list[int], frames: list[dict],
    model: str, runtime: dict[str, str], timings: dict[str, float], error: str | None = None,
    warnings: list[str] | None = None,
) -> dict:
    """The one schema of `ask --json`, chat turns, caption records and the API's `Answer.record()`."""
    return {
        "video": None if video is None else display(video),
        "question": question,
        "prompt": prompt,
        "answer": answer,
        "tokens": tokens,
        "frames": frames,
        "model": model,
        "runtime": runtime,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "warnings": list(warnings or []),
        "error": error,
    }


def json_line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def print_json(rec: dict) -> None:
    write(json_line(rec))


def stream(pieces: Iterator[str], stop: Callable[[], bool] = lambda: False,
           waiting: AbstractContextManager = nullcontext()) -> None:
    """Print the answer's text as it is generated.

    `stop()` is asked after each piece: true ends the answer there with KeyboardInterrupt, and `pieces` is
    closed, so its producer drops the unfinished turn at once. `waiting` (the caller's spinner) is entered while
    the prefill runs, until the first piece.
    """
    shown = False
    try:
        with waiting:
            first = next(pieces, "").lstrip()
        for piece in itertools.chain([first], pieces):
            write(piece)
            shown = True
            if stop():
                raise KeyboardInterrupt
    except (KeyboardInterrupt, VideoQAError):  # stopped, or out of memory: end the line before what follows
        if shown:
            write("\n")
        raise
    finally:
        pieces.close()
    write("\n")


def csv_lines(rec: dict, number: int) -> str:
    """A CSV row, after the header line for the first record; list and object fields JSON-encoded."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FIELDS, lineterminator="\n", extrasaction="ignore")
    if number == 1:
        writer.writeheader()
    writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in rec.items()})
    return buffer.getvalue()


def split_lines(text: str) -> list[str]:
    """JSONL lines: split at "\\n" only (U+2028 and U+0085 may stand inside a JSON string)."""
    if not text:
        return []  # an empty file: `kill -9` before the first record, or `touch`
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


class Foreign(ValueError):
    """A file that is not a videoqa records file of its format, so it cannot be resumed; the message says why."""


def read_jsonl(text: str) -> list[dict | None]:
    """The records of a JSONL file; None for a line that is no JSON."""
    records: list[dict | None] = []
    for line in split_lines(text):
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append(None)
    return records


def read_csv(text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if text and reader.fieldnames != FIELDS:
        raise Foreign("its header is not videoqa's CSV header")
    return list(reader)


def cue_text(rec: dict) -> str:
    """A timeline record's text as one cue or section: the answer (or why there is none) without blank lines, which
    end a cue, and without `-->`, which starts one."""
    text = rec["answer"] or (f"[no answer: {rec['error']}]" if rec.get("error") else "[no answer]")
    return "\n".join(line.strip() for line in text.replace("-->", "→").splitlines() if line.strip())


def stamp(seconds: float, mark: str) -> str:
    """HH:MM:SS,mmm (SRT, `mark` ",") or HH:MM:SS.mmm (WebVTT, ".")."""
    hours, millis = divmod(round(seconds * 1000), 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02d}:{minutes:02d}:{millis // 1000:02d}{mark}{millis % 1000:03d}"


def srt_cue(rec: dict, number: int) -> str:
    return f"{number}\n{stamp(rec['start'], ',')} --> {stamp(rec['end'], ',')}\n{cue_text(rec)}\n\n"


def vtt_cue(rec: dict, number: int) -> str:
    """A WebVTT cue (after the file's header for the first); &, < and > escaped, as cue text requires."""
    text = cue_text(rec).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    header = "WEBVTT\n\n" if number == 1 else ""
    return f"{header}{stamp(rec['start'], '.')} --> {stamp(rec['end'], '.')}\n{text}\n\n"


def md_section(rec: dict, number: int) -> str:
    """A `## 00:00–00:30` section (after the file's title for the first); no blank line inside, so a blank line
    ends each section as it ends a cue."""
    from videoqa.windows import clock

    title = f"# Timeline of {' '.join(display(rec['video']).splitlines())}\n\n" if number == 1 else ""
    return f"{title}## {clock(rec['start'])}–{clock(rec['end'])}\n{cue_text(rec)}\n\n"


TIMING = re.compile(r"(\d+:\d\d:\d\d[,.]\d{3}) --> (\d+:\d\d:\d\d[,.]\d{3})")
HEADING = re.compile(r"## (\S+)–(\S+)")


def _spans(blocks: list[str], pattern: re.Pattern, line: int) -> list[dict | None]:
    """{"start", "end"} of each block whose `line` matches `pattern`, None for a block that does not."""
    from videoqa.windows import parse_time

    found: list[dict | None] = []
    for block in blocks:
        lines = block.split("\n")
        match = pattern.fullmatch(lines[line]) if len(lines) > line else None
        found.append(None if match is None else {
            "start": parse_time(match[1].replace(",", ".")), "end": parse_time(match[2].replace(",", "."))})
    return found


def _blocks(text: str, header: str | None = None) -> list[str]:
    """The blank-line-separated blocks of a cue file, less its header block (which must be there, if any)."""
    blocks = [block for block in text.split("\n\n") if block.strip()]
    if header is not None and blocks:
        if not blocks[0].startswith(header):
            raise Foreign(f"it does not start with {header!r}")
        blocks = blocks[1:]
    return blocks


@dataclass(frozen=True)
class Form:
    """A records file format: a record as text (`number` counts from 1; the first carries the file's header), what
    ends a whole entry, the entries of a file read back (None for one that is not a record), and how entry `number`
    begins whatever its record: for --resume, which drops a half-written last entry only if it begins so."""

    entry: Callable[[dict, int], str]
    read: Callable[[str], list[dict | None]]
    head: Callable[[int], str]
    end: str = "\n"

    def could_begin(self, text: str, number: int) -> bool:
        """Whether `text` can be the first part of entry `number`."""
        head = self.head(number)
        return text[: len(head)] == head[: len(text)]


FORMS = {
    "jsonl": Form(lambda rec, number: json_line(rec), read_jsonl, lambda number: "{"),
    "csv": Form(csv_lines, read_csv, lambda number: ",".join(FIELDS) + "\n" if number == 1 else ""),
    "srt": Form(srt_cue, lambda text: _spans(_blocks(text), TIMING, 1), lambda number: f"{number}\n", "\n\n"),
    "vtt": Form(vtt_cue, lambda text: _spans(_blocks(text, "WEBVTT"), TIMING, 0),
                lambda number: "WEBVTT\n\n" if number == 1 else "", "\n\n"),
    "md": Form(md_section, lambda text: _spans(_blocks(text, "# "), HEADING, 0),
               lambda number: "# Timeline of " if number == 1 else "## ", "\n\n"),
}


def markdown(model: str, media: Path | str | None, turns: list[dict]) -> str:
    """A conversation as Markdown."""
    lines = [f"# videoqa chat\n\nModel: `{model}`  \nMedia: `{display(media or '')}`\n"]
    for turn in turns:
        lines.append(f"**You:** {turn['question']}\n\n**Answer:** {turn['answer']}\n")
    return "\n".join(lines)


def conversation_json(model: str, media: Path | str | None, turns: list[dict]) -> str:
    return json.dumps({"model": model, "media": display(media or ""), "turns": turns}, indent=2, ensure_ascii=False)


def stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first of the stop strings begins in `text`, or None."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not shown until known)."""
    return max((n for stop in stops for n in range(min(len(stop), len(text) + 1) - 1, 0, -1)
                if text.endswith(stop[:n])), default=0)


class Streamed:
    """An answer's text as its tokens come, one at a time (`add`, then `end`): each token decoded with one token
    of context so SentencePiece spaces come out right; a piece that ends inside a multi-byte character waits for
    the next token; nothing from the first stop string on is shown, and what could begin one waits until known.
    (Pushed rather than pulled: a batch's rows each have one.)"""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the context already decoded
        self.text, self.shown, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        """The text this token lets show ("" for none yet)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) <= len(before) or text.endswith("\ufffd") or self.stopped:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.text += text[len(before) :]
        at = stop_index(self.text, self.stops)
        end = at if at is not None else len(self.text) - held_back(self.text, self.stops)
        self.stopped = at is not None
        piece, self.shown = self.text[self.shown : end], max(self.shown, end)
        return piece

    def end(self) -> str:
        """What was held back for a stop string that never came."""
        piece = "" if self.stopped else self.text[self.shown :]
        self.shown = len(self.text)
        return piece


def texts(tokens: Iterable[int], tokenizer, stops: tuple[str, ...] = ()) -> Iterator[str]:
    """The answer's text pieces as `tokens` come, up to the first stop string (see `Streamed`)."""
    streamed = Streamed(tokenizer, stops)
    for token in tokens:
        if piece := streamed.add(token):
            yield piece
    if piece := streamed.end():
        yield piece
