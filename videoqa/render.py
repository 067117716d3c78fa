"""Stage 6: what the user sees. Answers go to stdout, progress and errors to stderr.

On a terminal the answer streams through rich; into a pipe it is plain text.
rich honours NO_COLOR by itself.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

stderr = Console(stderr=True, highlight=False)  # progress and notices; `--quiet` silences it
errors = Console(stderr=True, highlight=False)  # errors are never silenced


@contextmanager
def progress(message: str) -> Iterator[None]:
    """A spinner on stderr while a slow stage runs (silent when stderr is not a terminal)."""
    if not stderr.is_terminal or stderr.quiet:
        yield
        return
    status = stderr.status(escape(message))  # messages hold file and model names: "[" is no markup there
    try:  # not `with`: a Ctrl-C landing inside start() must still stop the spinner's thread
        status.start()
        yield
    finally:
        status.stop()


def note(message: str) -> None:
    """A one-line notice on stderr (silenced by --quiet)."""
    stderr.print(f"[dim]note:[/] {escape(message)}", markup=True, soft_wrap=True)


def error(message: str) -> None:
    """The one error line; the message is plain text (a file named `x[/].mp4` is no markup)."""
    errors.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)


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


def stream(tokens: Iterator[int], tokenizer, stop: Callable[[], bool] = lambda: False) -> list[int]:
    """Print the answer as it is generated; return every token id produced.

    `stop()` is asked after each token: true ends the answer there with KeyboardInterrupt, and `tokens`
    is closed, so its producer can undo the unfinished turn at once.
    """
    produced: list[int] = []

    def record() -> Iterator[int]:
        for token in tokens:
            produced.append(token)
            yield token
            if stop():
                raise KeyboardInterrupt

    out = Console(highlight=False, soft_wrap=True) if sys.stdout.isatty() else None
    deltas = texts(record(), tokenizer)
    try:
        with progress("Reading the prompt…"):  # the prefill runs until the first token
            first = next(deltas, "").lstrip()
        for delta in itertools.chain([first], deltas):
            if out is not None:
                out.print(delta, end="", markup=False)
            else:
                sys.stdout.write(delta)
                sys.stdout.flush()
    finally:
        tokens.close()
        print()
    return produced


class Interrupt:
    """While active, a first Ctrl-C only sets `requested` (the work stops at a safe point); a second stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self) -> Interrupt:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


@contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A bar with rate and ETA on stderr; yields the function that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), "ETA", TimeRemainingColumn()]
    with Progress(*columns, console=stderr, disable=not stderr.is_terminal or stderr.quiet) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def summary(rows: dict[str, str]) -> None:
    """A two-column table on stderr."""
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for name, value in rows.items():
        table.add_row(name, value)
    stderr.print(table)


def print_json(record: dict) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
