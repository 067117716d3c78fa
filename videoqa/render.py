"""The terminal's stderr: progress, notes and errors (rich, which honours NO_COLOR), and stopping cleanly on
Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

from videoqa.names import display

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
    stderr.print(f"[dim]note:[/] {escape(display(message))}", markup=True, soft_wrap=True)


class Notes(logging.Handler):
    """What the library says on the "videoqa" logger (a feature cache not written, ...) is a note here."""

    def emit(self, record: logging.LogRecord) -> None:
        note(record.getMessage())


def show_notes() -> None:
    logger = logging.getLogger("videoqa")
    if not any(isinstance(h, Notes) for h in logger.handlers):
        logger.addHandler(Notes())
        logger.propagate = False


def error(message: str) -> None:
    """One line on stderr; file names that are not UTF-8 are shown with U+FFFD, like in records."""
    errors.print(f"[bold red]error:[/] {escape(display(message))}", markup=True, soft_wrap=True)


class Interrupt:
    """While active, a first Ctrl-C (or SIGTERM, SIGHUP) only sets `requested`: the work stops at a safe point
    and the exit code is 128 + the signal's number. A second stops at once, with the same code."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,)):
        self.signals, self.requested, self.code = signals, False, 0

    def __enter__(self) -> Interrupt:
        self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.requested, self.code = True, 128 + signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what a batch job finishes its batch for


@contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A bar with the time spent and left on stderr; yields the function that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), eta_column()]
    with Progress(*columns, console=stderr, disable=not stderr.is_terminal or stderr.quiet) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def eta(elapsed: float | None, done: float, total: float | None) -> str:
    """The time left at the pace of the work finished so far (a batch's records arrive together, so a rate over
    recent advances would claim a second for minutes); nothing until something is finished."""
    if not done or not elapsed or total is None:
        return "ETA -:--:--"
    left = elapsed / done * max(total - done, 0)
    return f"ETA {int(left) // 3600}:{int(left) // 60 % 60:02d}:{int(left) % 60:02d}"


def eta_column():
    """A rich column showing `eta` (rich.progress is imported only when a bar is drawn)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Column(ProgressColumn):
        def render(self, task) -> Text:
            return Text(eta(task.elapsed, task.completed, task.total), style="progress.remaining")

    return Column()


def summary(rows: dict[str, str]) -> None:
    """A two-column table on stderr."""
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for name, value in rows.items():
        table.add_row(name, value)
    stderr.print(table)

