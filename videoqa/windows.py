"""Time windows of a video, and the segments a timeline or a search cuts a video into.

Times are given as seconds (`90`, `90.5`) or `[HH:]MM:SS[.mmm]` (`1:30`, `01:02:03.5`); durations (`--every`) also as
`10s`, `2m`, `1h`. A window [start, end) holds the frames whose presentation time t satisfies start <= t < end; an
open end reaches the end of the video. Everything here is checked once and refused as a usage error (exit code 2)
in one line: the video side of a window (a start past the end, a window without a frame) is checked where the
video's frame times are known, in `Window.positions`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from videoqa.errors import VideoQAError

CLOCK = re.compile(r"(?:(\d+):)?([0-5]?\d):([0-5]?\d(?:\.\d+)?)")  # [HH:]MM:SS[.mmm]; minutes and seconds below 60
SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")
UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_SECONDS = 1e9  # about 32 years: a larger time is a typing mistake, and past what floats count frames by


def parse_time(text: str | float | int, what: str = "time") -> float:
    """Seconds from `90`, `90.5` or `[HH:]MM:SS[.mmm]` (a number is taken as seconds); negative, unparsable or
    absurdly large times are refused, naming `what` (the option)."""
    seconds = _number(text)
    if seconds is None:
        raise VideoQAError(f"{what} {_short(text)}: give seconds (90, 90.5) or [HH:]MM:SS[.mmm] (1:30, 01:02:03.5)")
    if math.isnan(seconds) or seconds < 0:
        raise VideoQAError(f"{what} {_short(text)}: times are not negative")
    return _bounded(seconds, text, what)


def parse_duration(text: str | float | int, what: str = "--every") -> float:
    """A positive length of time: a time as `parse_time` reads it, or a number with a unit (`10s`, `2m`, `1.5h`)."""
    given = str(text).strip()
    if isinstance(text, str) and given[-1:].lower() in UNITS and SECONDS.fullmatch(given[:-1]):
        seconds = float(given[:-1]) * UNITS[given[-1].lower()]
    else:
        seconds = _number(text)
    if seconds is None:
        raise VideoQAError(f"{what} {_short(text)}: give a length such as 30, 10s, 2m or 1:30")
    if math.isnan(seconds) or seconds <= 0:
        raise VideoQAError(f"{what} {_short(text)}: a length of time must be more than 0 s")
    return _bounded(seconds, text, what)


def _number(text: str | float | int) -> float | None:
    """Seconds from a number or from text in a form `parse_time` takes; None for any other text."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return _seconds(str(text).strip())
    except (OverflowError, ValueError):  # more digits than an int or a float conversion takes
        return math.inf


def _seconds(text: str) -> float | None:
    if text.startswith("-") and _seconds(text[1:]) is not None:
        return -_seconds(text[1:])
    if SECONDS.fullmatch(text):
        return float(text)
    clock = CLOCK.fullmatch(text)
    if clock is None:
        return None
    hours, minutes, seconds = clock.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


def _bounded(seconds: float, text: object, what: str) -> float:
    if seconds > MAX_SECONDS:
        raise VideoQAError(f"{what} {_short(text)}: more than {MAX_SECONDS:.0e} s, longer than any video")
    return seconds


def _short(text: object) -> str:
    """A value as an error line quotes it: a thousand-digit time is cut short."""
    shown = repr(text)
    return shown if len(shown) <= 40 else f"{shown[:30]}… ({len(shown)} characters)"


@dataclass(frozen=True)
class Window:
    """The part [start, end) of a video that frames are sampled from; `end` None: to the video's end."""

    start: float = 0.0
    end: float | None = None

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None

    def key(self) -> str:
        """What the feature cache tells windows apart by."""
        return "whole" if self.whole else f"{self.start!r}-{self.end!r}"

    def positions(self, times: list[float], end: float) -> list[int]:
        """The positions of the frames (presentation `times`, ascending; the video ends at `end` s) inside the
        window; a start at or past the end, or a window holding no frame, is a usage error."""
        if self.whole:
            return list(range(len(times)))
        if self.start >= end:
            raise VideoQAError(f"start {clock(self.start)} ({self.start:g} s) is at or past the end of the video, "
                               f"which lasts {end:.2f} s")
        inside = [i for i, t in enumerate(times) if self.start <= t and (self.end is None or t < self.end)]
        if not inside:
            raise VideoQAError(f"the window {self.label()} holds no frame of the video")
        return inside

    def label(self) -> str:
        return f"{clock(self.start)}–{clock(self.end) if self.end is not None else 'end'}"


WHOLE = Window()


def window(start: str | float | None = None, end: str | float | None = None) -> Window:
    """The window between two times (either may be None: the start or the end of the video); an end at or before
    the start is refused."""
    first = 0.0 if start is None else parse_time(start, "start")
    last = None if end is None else parse_time(end, "end")
    if last is not None and last <= first:
        raise VideoQAError(f"end {clock(last)} is not after start {clock(first)}: a window needs end > start")
    return Window(first, last)


def segments(last: float, end: float, *, frames: int, every: float | None = None,
             count: int | None = None) -> list[Window]:
    """Consecutive windows covering a video of `frames` frames whose last frame starts at `last` s and which ends
    at `end` s: of `every` seconds each ([k * every, (k + 1) * every), as many as reach the last frame), or `count`
    equal parts. The last window ends at the video's end. More segments than frames is refused: most would hold
    none."""
    if count is not None and count < 1:
        raise VideoQAError(f"segments {count}: give at least 1")
    wanted = count if count is not None else math.floor(last / every) + 1
    if wanted > frames:
        given = f"--segments {count}" if count is not None else f"--every {every:g} s"
        raise VideoQAError(f"{given} makes {wanted:,} segments and the video has {frames:,} frames: "
                           "give fewer segments or longer ones")
    if count is not None:
        bounds = [end * k / count for k in range(count + 1)]
    else:
        bounds = [every * k for k in range(wanted)] + [end]
    return [Window(round(a, 6), round(b, 6)) for a, b in zip(bounds, bounds[1:])]


def clock(seconds: float) -> str:
    """`MM:SS`, `HH:MM:SS` from an hour on, with `.mmm` where the time is not a whole second: `01:30`, `00:02.500`."""
    millis = round(seconds * 1000)
    whole, millis = divmod(millis, 1000)
    hours, rest = divmod(whole, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"
    return f"{text}.{millis:03d}" if millis else text
