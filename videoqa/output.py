"""What goes to stdout or an output file: the one record schema, its JSON / JSONL / CSV / Markdown forms, and
the answer streamed as plain text.

stdout failures are decided here once: a reader that went away (a closed pipe) ends the run quietly, any
other failure to write (a full disk, a closed stdout) is a one-line error with exit code 2.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from videoqa.errors import VideoQAError

FIELDS = ["video", "question", "prompt", "answer", "tokens", "frames", "model", "runtime", "timings", "error"]


class OutputClosed(Exception):
    """stdout's reader went away (`| head -1`): stop quietly, as `cat` does."""


def display(path: Path | str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogate escapes) become
    U+FFFD, so JSON, CSV and the terminal always get valid text."""
    return os.fsencode(path).decode("utf-8", "replace")


def check_stdout() -> None:
    """Before any slow work, for commands that answer on stdout: one started with stdout closed (`>&-`) fails now."""
    if sys.stdout is None:
        raise VideoQAError("cannot write to stdout: it is closed")


def write(text: str) -> None:
    """Write to stdout at once (answers stream, records are seen as they are done)."""
    check_stdout()
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None
    except OSError as e:
        raise VideoQAError(f"cannot write to stdout ({e.strerror or e})") from None


def record(
    *, video: Path | str | None, question: str, prompt: str, answer: str, tokens: list[int], frames: list[dict],
    model: str, runtime: dict[str, str], timings: dict[str, float], error: str | None = None,
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
        "error": error,
    }


def json_line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def print_json(rec: dict) -> None:
    write(json_line(rec))


def stream(pieces: Iterator[str], stop: Callable[[], bool] = lambda: False) -> None:
    """Print the answer's text as it is generated.

    `stop()` is asked after each piece: true ends the answer there with KeyboardInterrupt, and `pieces` is
    closed, so its producer drops the unfinished turn at once.
    """
    from videoqa.render import progress

    shown = False
    try:
        with progress("Reading the prompt…"):  # the prefill runs until the first piece
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


def csv_lines(rec: dict, header: bool) -> str:
    """A CSV row (after the header line, if asked); list and object fields JSON-encoded."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FIELDS, lineterminator="\n", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in rec.items()})
    return buffer.getvalue()


FORMATS: dict[str, Callable[[dict, bool], str]] = {"jsonl": lambda rec, header: json_line(rec), "csv": csv_lines}


def split_lines(text: str) -> list[str]:
    """JSONL lines: split at "\\n" only (U+2028 and U+0085 may stand inside a JSON string)."""
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def markdown(model: str, media: Path | str | None, turns: list[dict]) -> str:
    """A conversation as Markdown."""
    lines = [f"# videoqa chat\n\nModel: `{model}`  \nMedia: `{display(media or '')}`\n"]
    for turn in turns:
        lines.append(f"**You:** {turn['question']}\n\n**Answer:** {turn['answer']}\n")
    return "\n".join(lines)


def conversation_json(model: str, media: Path | str | None, turns: list[dict]) -> str:
    return json.dumps({"model": model, "media": display(media or ""), "turns": turns}, indent=2, ensure_ascii=False)


def texts(tokens: Iterable[int], tokenizer) -> Iterator[str]:
    """Decoded text deltas, each token decoded with one token of context so SentencePiece spaces come out right;
    a delta that ends inside a multi-byte character waits for the next token."""
    ids: list[int] = []
    prefix = read = 0  # ids[prefix:read] is the context already shown
    for token in tokens:
        ids.append(token)
        shown = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        text = tokenizer.decode(ids[prefix:], skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown) :]
            prefix, read = read, len(ids)
