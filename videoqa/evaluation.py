"""`videoqa eval`'s items and scores: benchmark files read into items (JSONL, or a JSON array, with a field mapping
for other layouts), an answer judged against the expected one, and accuracy with a 95% Wilson interval, overall and
by a field."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videoqa.errors import Exit, VideoQAError
from videoqa.names import display

FIELDS = ("video", "question", "choices", "answer", "start", "end")
SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")  # tried in order for a video named without one (Video-MME)
LETTER = re.compile(r"\(([A-Z])\)|([A-Z])\.?")  # an answer given as an option's letter: A, (A) or A.
LABEL = re.compile(r"(?:\(([A-Z])\)|([A-Z])\.)(?:\s|$)")  # an option that begins with its letter: "C. Candles."
TRAILING = ".,;:!?"


def parse_map(spec: str | None) -> dict[str, str]:
    """`--map video=videoID,choices=options` -> {"video": "videoID", "choices": "options"}: which key of another
    benchmark's layout holds each field."""
    mapping: dict[str, str] = {}
    for pair in [] if spec is None else spec.split(","):
        field, _, key = (part.strip() for part in pair.partition("="))
        if not field or not key:
            raise VideoQAError(f"--map {spec!r}: give FIELD=KEY pairs separated by commas, "
                               "e.g. video=videoID,choices=options", Exit.USAGE)
        if field not in FIELDS:
            raise VideoQAError(f"--map {spec!r}: {field} is not one of {', '.join(FIELDS[:-1])} or {FIELDS[-1]}",
                               Exit.USAGE)
        if field in mapping:
            raise VideoQAError(f"--map {spec!r}: {field} is mapped twice", Exit.USAGE)
        mapping[field] = key
    return mapping


@dataclass(frozen=True)
class Item:
    """One question of a benchmark; `number` is its line in a JSONL file, its position (from 1) in a JSON array."""

    number: int
    video: Path
    question: str
    choices: tuple[str, ...] | None
    answer: str | None
    start: float | str | None
    end: float | str | None
    fields: dict  # the object as read: for --by, and for the record


def read_items(path: Path, mapping: dict[str, str] | None = None, *, videos: Path | None = None) -> list[Item]:
    """The items of a JSONL file, or of a JSON array when the file begins with `[`; relative video paths are taken
    from `videos` (default: the file's folder). Bad input is refused at once, naming the file and the line."""
    text = _read_text(path)
    array = text.lstrip().startswith("[")
    objects = _array(path, text) if array else _lines(path, text)
    if not objects:
        raise VideoQAError(f"{display(path)}: no items", Exit.INPUT)
    base = path.parent if videos is None else videos
    return [_item(_Where(path, number, array), value, mapping or {}, base) for number, value in objects]


@dataclass(frozen=True)
class _Where:
    """Where an item is, for error messages: `items.jsonl:3` for a line, `items.json: item 3` in an array."""

    path: Path
    number: int
    array: bool

    def fail(self, problem: str) -> VideoQAError:
        where = f"{display(self.path)}: item {self.number}" if self.array else f"{display(self.path)}:{self.number}"
        return VideoQAError(f"{where}: {problem}", Exit.INPUT)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise VideoQAError(f"{display(path)}: cannot read it ({e.strerror})", Exit.INPUT) from None
    except UnicodeDecodeError:
        raise VideoQAError(f"{display(path)}: not UTF-8 text", Exit.INPUT) from None


def _lines(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL file."""
    found = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                found.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise _Where(path, number, array=False).fail(f"not JSON ({e.msg}, column {e.colno})") from None
    return found


def _array(path: Path, text: str) -> list[tuple[int, Any]]:
    """(position from 1, value) of each element of a JSON array."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Where(path, e.lineno, array=False).fail(f"not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(values, list):
        raise VideoQAError(f"{display(path)}: not a JSON array of items", Exit.INPUT)
    return list(enumerate(values, 1))


def _item(where: _Where, value: Any, mapping: dict[str, str], base: Path) -> Item:
    if not isinstance(value, dict):
        raise where.fail(f"not a JSON object (a {_kind(value)})")
    found = {field: value.get(mapping.get(field, field)) for field in FIELDS}
    for field in ("video", "question"):
        if not isinstance(found[field], str) or not found[field].strip():
            raise where.fail(_missing(value, field, mapping.get(field, field)))
    return Item(where.number, _video(found["video"], base), found["question"],
                _choices(where, found["choices"], mapping), _answer(where, found["answer"], mapping),
                _time(where, found["start"], "start", mapping), _time(where, found["end"], "end", mapping), value)


def _missing(value: dict, field: str, key: str) -> str:
    """What is wrong with a required field: absent (perhaps under another key), or not text."""
    if key not in value:
        return f'no "{key}" (the {field}; --map {field}=KEY names another key)'
    return f'"{key}" (the {field}) must be non-empty text, not {json.dumps(value[key])[:40]}'


def _kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _video(name: str, base: Path) -> Path:
    """The video's path; a name without a suffix (Video-MME's videoID) is looked for with each of SUFFIXES."""
    path = base / name
    if path.exists() or path.suffix:
        return path
    return next((found for suffix in SUFFIXES if (found := path.with_suffix(suffix)).exists()), path)


def _choices(where: _Where, value: Any, mapping: dict[str, str]) -> tuple[str, ...] | None:
    if value is None:
        return None
    texts = value if isinstance(value, list) else []
    if len(texts) < 2 or not all(_scalar(text) for text in texts):
        raise where.fail(f'"{mapping.get("choices", "choices")}" (the choices) must be a list of two or more texts')
    return tuple(str(text) for text in texts)


def _answer(where: _Where, value: Any, mapping: dict[str, str]) -> str | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise where.fail(f'"{mapping.get("answer", "answer")}" (the answer) must be text or a whole number')
    return None if value is None else str(value)


def _time(where: _Where, value: Any, field: str, mapping: dict[str, str]) -> float | str | None:
    """Seconds as a float, or text (`1:30`) as given, for the session to parse."""
    if value is not None and not _scalar(value):
        raise where.fail(f'"{mapping.get(field, field)}" (the {field}) must be seconds or [HH:]MM:SS text')
    return float(value) if isinstance(value, (int, float)) else value


def _scalar(value: Any) -> bool:
    """Text or a number (JSON's true and false are neither)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def check_windows(path: Path, items: Sequence[Item]) -> None:
    """Each item's start and end as a window of its video, checked before anything loads."""
    from videoqa.windows import window

    for item in items:
        try:
            window(item.start, item.end)
        except VideoQAError as e:
            raise VideoQAError(f"{display(path)}:{item.number}: {e}", Exit.INPUT) from None


def every_record(out: Path | None, judged: list[dict]) -> list[dict]:
    """The records accuracy is counted over: every whole entry of the --out file (those of an earlier run it
    resumed included), or the ones of this run when they went to stdout."""
    from videoqa.output import read_jsonl

    if out is None or str(out) == "-" or not out.is_file():
        return judged
    # a half-written last entry reads as None: not counted
    return [rec for rec in read_jsonl(out.read_text(encoding="utf-8", errors="replace")) if rec is not None]


def judge(answer: str | None, given: str, choices: Sequence[str] | None) -> bool | None:
    """Whether `given` is the expected `answer`; None when there is no expected answer. Texts are compared
    normalized: casefolded, stripped of surrounding whitespace and of trailing . , ; : ! ?

    With choices, `given` is the chosen option's text, and it is correct when
    - the answer equals it (answer "Apples.", chosen "apples"), or
    - the answer is a letter A-Z, as `C`, `(C)` or `C.`, naming the chosen option: its label when the option
      begins with one (`C. Candles.`, `(C) Candles`), else its position (A the first, B the second, ...).
      Video-MME's answer "C" with options "A. Apples.", "B. Candles.", "C. Berries." names "C. Berries.".
    Without choices, it is correct when it equals the answer, or begins with it and then a character that is no
    letter or digit: "yes" is answered by "Yes, it is." but "no" is not by "Nothing".
    """
    if answer is None:
        return None
    expected, said = _normal(answer), _normal(given)
    if expected == said:
        return True
    if choices is not None:
        letter = LETTER.fullmatch(answer.strip())
        return letter is not None and (letter[1] or letter[2]) == _letter_of(given, choices)
    rest = said[len(expected):]
    return bool(expected) and said.startswith(expected) and not rest[0].isalnum()


def _normal(text: str) -> str:
    return text.casefold().strip().rstrip(TRAILING).strip()


def _letter_of(option: str, choices: Sequence[str]) -> str | None:
    """The letter naming an option: its label ("C. Candles." -> C), else its position among the choices."""
    label = LABEL.match(option.strip())
    if label is not None:
        return label[1] or label[2]
    positions = [index for index, choice in enumerate(choices) if _normal(choice) == _normal(option)]
    return chr(ord("A") + positions[0]) if positions and positions[0] < 26 else None


def wilson(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at the default z): unlike p ± z·se it stays inside [0, 1]
    and is not empty at 0/n or n/n, so small benchmarks get an honest range. Nothing judged: (0.0, 1.0)."""
    if total == 0:
        return 0.0, 1.0
    p, z2 = correct / total, z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z / (1 + z2 / total) * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Accuracy:
    """Correct answers out of those judged."""

    correct: int
    total: int

    @property
    def value(self) -> float:
        """correct / total; 0.0 when nothing was judged (the interval, 0-100%, says how little that means)."""
        return self.correct / self.total if self.total else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.total)

    def line(self) -> str:
        """`accuracy 62.5% (5/8), 95% CI 30.6–86.3%`"""
        low, high = self.interval
        return f"accuracy {self.value:.1%} ({self.correct}/{self.total}), 95% CI {low * 100:.1f}–{high:.1%}"


def accuracy(records: Iterable[dict], by: str | None = None) -> tuple[Accuracy, dict[str, Accuracy]]:
    """Accuracy over the records judged (`correct` True or False; errors and items without an answer have None),
    overall and, with `by`, for each value of that field of the item (under "item"; "(none)" where it lacks it),
    in the values' sorted order."""
    overall, groups = Accuracy(0, 0), {}
    for record in records:
        correct = record.get("correct")
        if not isinstance(correct, bool):
            continue
        counted = [overall]
        if by is not None:
            value = (record.get("item") or {}).get(by)
            counted.append(groups.setdefault("(none)" if value is None else str(value), Accuracy(0, 0)))
        for tally in counted:
            tally.correct += correct
            tally.total += 1
    return overall, dict(sorted(groups.items()))
