"""Questions as the user gives them: an argument, stdin or a file, checked once.

Bytes are read and decoded here (never by the locale), at most MAX_BYTES of them, so a non-UTF-8 question is a
usage error under any locale and `--prompt-file /dev/zero` ends at once. A leading UTF-8 BOM is dropped.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from videoqa.errors import VideoQAError

CAPTION_PROMPT = "Describe this video."  # what caption asks of every video unless told otherwise
MAX_BYTES = 1_000_000  # 1 MB: far beyond any model's context, small enough to refuse at once


def check_question(question: str) -> str:
    """The question stripped; empty, over-long, or not UTF-8 (bytes kept as surrogate escapes) is refused."""
    if not isinstance(question, str):
        raise VideoQAError(f"the question must be text, not {type(question).__name__}")
    try:
        size = len(question.encode("utf-8"))
    except UnicodeEncodeError:
        raise VideoQAError("the question is not valid UTF-8 text") from None
    if size > MAX_BYTES:
        raise VideoQAError(f"the question is {size:,} bytes long; the limit is {MAX_BYTES:,} (1 MB)")
    question = question.removeprefix("\ufeff").strip()
    if not question:
        raise VideoQAError("the question is empty")
    return question


def decode(data: bytes) -> str:
    """UTF-8 bytes -> text; invalid bytes stay as surrogate escapes, for check_question to refuse."""
    return data.decode("utf-8", "surrogateescape")


def stdin_bytes() -> BinaryIO:
    """stdin as bytes (a test's StringIO too); a stdin closed when the process started is a usage error."""
    if sys.stdin is None:
        raise VideoQAError("stdin is closed: there is nothing to read the question from")
    buffer = getattr(sys.stdin, "buffer", None)
    return buffer if buffer is not None else io.BytesIO(sys.stdin.read().encode("utf-8", "surrogateescape"))


def read_bounded(stream: BinaryIO) -> str:
    data = stream.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise VideoQAError(f"the question is longer than the limit of {MAX_BYTES:,} bytes (1 MB)")
    return decode(data)


def read_question(question: str | None, prompt_file: Path | None) -> str:
    """The question from the argument, `-` (stdin) or --prompt-file; never empty."""
    if prompt_file is not None:
        try:
            with open(prompt_file, "rb") as f:
                question = read_bounded(f)
        except OSError as e:
            raise VideoQAError(f"--prompt-file {prompt_file}: cannot read it ({e.strerror or e})") from None
    elif question == "-":
        question = read_bounded(stdin_bytes())
    if question is None:
        raise VideoQAError("no question: give QUESTION, - to read it from stdin, or --prompt-file")
    return check_question(question)


def lines(stream: BinaryIO) -> Iterator[str]:
    """Lines of a piped chat, each at most MAX_BYTES (a longer one is cut there and refused by check_question)."""
    while True:
        line = stream.readline(MAX_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_BYTES and not line.endswith(b"\n"):
            while (rest := stream.readline(MAX_BYTES)) and not rest.endswith(b"\n"):
                pass  # skip the rest of the over-long line
        yield decode(line)
