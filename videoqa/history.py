"""The history: every answer of `ask` and every `chat` turn (and, with `--log`, each caption, timeline and eval
record) appended to one SQLite database, `$XDG_DATA_HOME/videoqa/logs.db`, to list and search later (`videoqa logs`)
and to go on with a conversation from (`videoqa chat --continue`).

One row per answer in `answers`; its files in `media`, each with its path and content hash (sha256, as the feature
cache keys a video), so a renamed or moved file is still found by what it holds; an FTS5 index, `answers_fts`, over
the questions and answers, kept in step by triggers. Several processes may append at once: the journal is WAL, a
writer waits for another (a busy timeout), and each row with its media is one IMMEDIATE transaction. The schema's
version is `PRAGMA user_version`; an older database is migrated, step by step, when it is opened.

Logging never fails an answer: a database that cannot be opened or written (a file where the folder should be, a
full disk, garbage bytes) is one warning on the "videoqa" logger, which the CLI shows as a `note:` line, and the
answer stands. `VIDEOQA_LOG=0` turns it off. Nothing here imports torch: `videoqa logs` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from videoqa.errors import Exit, VideoQAError
from videoqa.names import display

logger = logging.getLogger("videoqa")

BUSY_SECONDS = 10.0  # how long a writer waits for another before giving up
FILE = "logs.db"

# Each version's steps, run in order from the database's version to the last: a new database runs them all.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE answers (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            command TEXT NOT NULL,
            model TEXT,
            window_start REAL,
            window_end REAL,
            question TEXT NOT NULL DEFAULT '',
            prompt TEXT,
            answer TEXT NOT NULL DEFAULT '',
            tokens TEXT,
            frames TEXT,
            settings TEXT,
            timings TEXT,
            warnings TEXT,
            error TEXT,
            conversation TEXT,
            turn INTEGER)""",
        """CREATE TABLE media (
            answer INTEGER NOT NULL REFERENCES answers(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            path TEXT NOT NULL,
            hash TEXT,
            PRIMARY KEY (answer, position))""",
        "CREATE INDEX media_hash ON media(hash)",
        "CREATE INDEX answers_conversation ON answers(conversation, turn)",
        "CREATE VIRTUAL TABLE answers_fts USING fts5(question, answer, content='answers', content_rowid='id')",
        """CREATE TRIGGER answers_inserted AFTER INSERT ON answers BEGIN
            INSERT INTO answers_fts(rowid, question, answer) VALUES (new.id, new.question, new.answer);
        END""",
        """CREATE TRIGGER answers_deleted AFTER DELETE ON answers BEGIN
            INSERT INTO answers_fts(answers_fts, rowid, question, answer)
            VALUES ('delete', old.id, old.question, old.answer);
        END""",
        """CREATE TRIGGER answers_updated AFTER UPDATE OF question, answer ON answers BEGIN
            INSERT INTO answers_fts(answers_fts, rowid, question, answer)
            VALUES ('delete', old.id, old.question, old.answer);
            INSERT INTO answers_fts(rowid, question, answer) VALUES (new.id, new.question, new.answer);
        END""",
    ],
    2: ["ALTER TABLE answers ADD COLUMN runtime TEXT"],  # the device, dtype and quantization an answer ran with
}
VERSION = max(MIGRATIONS)

JSON_COLUMNS = ("tokens", "frames", "settings", "timings", "warnings", "runtime")
COLUMNS = ("time", "command", "model", "window_start", "window_end", "question", "prompt", "answer", *JSON_COLUMNS,
           "error", "conversation", "turn")

_warned: set[str] = set()  # databases a warning was given for: one per process


class Newer(Exception):
    """The database was written by a newer videoqa: its schema is left alone."""


def data_dir() -> Path:
    """The user's data dir (XDG), where the history and chat's readline history live."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "videoqa"


def path() -> Path:
    """Where the history is: `$XDG_DATA_HOME/videoqa/logs.db` (default `~/.local/share/videoqa/logs.db`)."""
    return data_dir() / FILE


def enabled() -> bool:
    """Whether answers are logged: always, unless VIDEOQA_LOG is 0 (or false, no, off)."""
    return os.environ.get("VIDEOQA_LOG", "").strip().lower() not in ("0", "false", "no", "off")


def new_conversation() -> str:
    """A fresh conversation id."""
    return uuid.uuid4().hex


def content_hash(file: str | Path) -> str | None:
    """The sha256 of a regular file's bytes (what the feature cache keys a video by); None for a pipe, a missing or
    unreadable file."""
    from videoqa.cache import file_hash

    file = Path(file)
    try:
        return file_hash(file) if file.is_file() else None
    except OSError:
        return None


def connect(file: Path | None = None, *, create: bool = True) -> sqlite3.Connection:
    """The history database, in WAL mode with a busy timeout, its schema created or migrated to VERSION. Raises
    sqlite3.Error or OSError when it cannot be opened, Newer when a newer videoqa wrote it."""
    file = path() if file is None else file
    if create:
        file.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(file, timeout=BUSY_SECONDS, isolation_level=None)  # transactions as written below
    try:
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_SECONDS * 1000)}")
        _wal(db)
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def _wal(db: sqlite3.Connection) -> None:
    """The WAL journal, set once for the file. Switching a new database to it is refused at once (not after the
    busy timeout) while another process opens it too: tried again until the timeout."""
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            busy = getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not (busy or "locked" in str(e)) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to VERSION, one version's steps after another, in one transaction (so two processes opening
    an old or new database at once migrate it once)."""
    if _version(db) == VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        found = _version(db)  # again, under the write lock: another process may have migrated it meanwhile
        if found > VERSION:
            raise Newer(f"written by a newer videoqa (schema {found}; this one knows up to {VERSION})")
        for version in range(found + 1, VERSION + 1):
            for step in MIGRATIONS[version]:
                db.execute(step)
        db.execute(f"PRAGMA user_version = {VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def settings_of(settings: Any) -> dict:
    """A Settings (or a dict of setting names) as the history keeps it: every setting by name; `frames` None when
    the frames are chosen by time (`fps`), as they were read."""
    from videoqa.settings import SPECS

    if isinstance(settings, dict):
        return dict(settings)
    found = {name: settings.get(name) for name in SPECS}
    if hasattr(settings, "stop"):  # stop strings: a list, not one of the table's settings
        found["stop"] = list(settings.stop)
    if found.get("fps") is not None:
        found["frames"] = None
    return found


def _bounds(window: Any, record: dict) -> tuple[float | None, float | None]:
    """(start, end) in seconds from a Window, a (start, end) pair or a {"start", "end"} mapping (None: the record's
    own `start` and `end`, a timeline segment's, if it has them); (None, None) for the whole video."""
    if window is None:
        window = record if "start" in record else None
    if window is None:
        return None, None
    if isinstance(window, dict):
        start, end = window.get("start"), window.get("end")
    elif isinstance(window, (tuple, list)):
        start, end = window
    else:
        start, end = window.start, window.end
    if not start and end is None:  # the whole video
        return None, None
    return float(start or 0.0), (None if end is None else float(end))


def log(record: dict, *, command: str, settings: Any, conversation: str | None = None, turn: int | None = None,
        window: Any = None, media: list[str | Path] | None = None) -> None:
    """Append one answer (`record`: the record schema, as `Answer.record()` makes it) to the history: the command
    that answered it, its `settings` (a Settings or a dict), the chat `conversation` and `turn` it belongs to, the
    time `window` its frames were sampled from, and its `media` files (default: the record's `video`), each hashed.

    Never raises: a history that cannot be written is one warning on the "videoqa" logger (once per process and
    database), and the caller goes on. Nothing is written when VIDEOQA_LOG=0."""
    if not enabled():
        return
    file = path()
    try:
        start, end = _bounds(window, record)
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "command": command,
               "model": record.get("model"), "window_start": start, "window_end": end,
               "question": record.get("question") or "", "prompt": record.get("prompt"),
               "answer": record.get("answer") or "", "tokens": record.get("tokens"), "frames": record.get("frames"),
               "settings": settings_of(settings), "timings": record.get("timings"),
               "warnings": record.get("warnings"), "runtime": record.get("runtime"), "error": record.get("error"),
               "conversation": conversation, "turn": turn}
        for name in JSON_COLUMNS:
            row[name] = None if row[name] is None else json.dumps(row[name], ensure_ascii=False)
        if media is None:
            media = [] if record.get("video") is None else [record["video"]]
        files = [(os.path.abspath(m), content_hash(m)) for m in media]
        with closing(connect(file)) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                names = ", ".join(COLUMNS)
                marks = ", ".join(f":{name}" for name in COLUMNS)
                answer = db.execute(f"INSERT INTO answers ({names}) VALUES ({marks})", row).lastrowid
                db.executemany("INSERT INTO media (answer, position, path, hash) VALUES (?, ?, ?, ?)",
                               [(answer, i, p, h) for i, (p, h) in enumerate(files)])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
    except Exception as e:  # the answer is out already: the history is not worth failing it for
        if str(file) not in _warned:
            _warned.add(str(file))
            logger.warning(f"the history was not written: {display(file)}: {_reason(e)} (VIDEOQA_LOG=0 or --no-log "
                         "turns it off)")


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return (e.strerror or str(e)).lower()
    return str(e) or type(e).__name__


def _reading() -> sqlite3.Connection | None:
    """The history, open to read (migrated if older); None when there is none yet. What cannot be read is a
    VideoQAError naming the file."""
    file = path()
    if not file.exists():
        return None
    try:
        return connect(file, create=False)
    except (sqlite3.Error, OSError, Newer) as e:
        raise VideoQAError(f"the history {display(file)} cannot be read: {_reason(e)}") from None


def _entry(row: sqlite3.Row, media: list[dict]) -> dict:
    found = dict(row)
    for name in JSON_COLUMNS:
        found[name] = None if found.get(name) is None else json.loads(found[name])
    start, end = found.pop("window_start"), found.pop("window_end")
    found["window"] = None if start is None and end is None else {"start": start, "end": end}
    found["media"] = media
    return found


def _entries(db: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[dict]:
    """The rows as dicts, JSON decoded, each with its media [{"path", "hash"}] in order."""
    ids = [row["id"] for row in rows]
    media: dict[int, list[dict]] = {i: [] for i in ids}
    for at in range(0, len(ids), 500):  # SQLite's limit on a statement's parameters
        chunk = ids[at:at + 500]
        marks = ", ".join("?" * len(chunk))
        for answer, file, digest in db.execute(f"SELECT answer, path, hash FROM media WHERE answer IN ({marks}) "
                                               "ORDER BY answer, position", chunk):
            media[answer].append({"path": file, "hash": digest})
    return [_entry(row, media[row["id"]]) for row in rows]


def fts_query(text: str) -> str:
    """Plain words as an FTS5 query: every word must occur (each quoted, so no word is read as FTS5 syntax)."""
    words = text.split()
    if not words:
        raise VideoQAError("--search: give a word to look for")
    return " ".join('"' + word.replace('"', '""') + '"' for word in words)


def recent(n: int | None = 10, *, search: str | None = None, video: str | Path | None = None) -> list[dict]:
    """The `n` newest answers (None or 0: all), newest first, as dicts: id, time (ISO 8601, UTC), command, model,
    media [{"path", "hash"}], window ({"start", "end"} or None), question, prompt, answer, tokens, frames,
    settings, timings, warnings, runtime, error, conversation, turn. `search`: only those whose question or answer
    holds every word (FTS5); `video`: only those about that file's content (by its hash, whatever its name now)."""
    where, params = [], []
    if search is not None:
        where.append("id IN (SELECT rowid FROM answers_fts WHERE answers_fts MATCH ?)")
        params.append(fts_query(search))
    if video is not None:
        digest = content_hash(video)
        if digest is None:
            from videoqa.frames import check_file

            check_file(Path(video))  # says why it cannot be read (exit code 3)
            raise VideoQAError(f"{display(video)}: not a regular file, which the history knows by its content",
                               Exit.INPUT)
        where.append("id IN (SELECT answer FROM media WHERE hash = ?)")
        params.append(digest)
    db = _reading()
    if db is None:
        return []
    with closing(db):
        db.row_factory = sqlite3.Row
        query = "SELECT * FROM answers" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC"
        if n:
            query += f" LIMIT {int(n)}"
        try:
            return _entries(db, db.execute(query, params).fetchall())
        except sqlite3.Error as e:
            raise VideoQAError(f"the history {display(path())} cannot be read: {_reason(e)}") from None


def last_conversation() -> dict | None:
    """The newest chat conversation, to go on with: {"conversation", "model", "media", "window", "settings",
    "turns"} with its turns [{"turn", "question", "answer", "tokens", "media"}] in order (up to the first one
    missing; a turn's media: every file of the conversation by then, [{"path", "hash"}]), the
    media, window and settings of its last turn. None when no chat was logged."""
    db = _reading()
    if db is None:
        return None
    with closing(db):
        db.row_factory = sqlite3.Row
        try:
            newest = db.execute("SELECT conversation FROM answers WHERE command = 'chat' AND conversation IS NOT NULL "
                                "ORDER BY id DESC LIMIT 1").fetchone()
            if newest is None:
                return None
            rows = db.execute("SELECT * FROM answers WHERE conversation = ? ORDER BY turn, id",
                              (newest["conversation"],)).fetchall()
            entries = _entries(db, rows)
        except sqlite3.Error as e:
            raise VideoQAError(f"the history {display(path())} cannot be read: {_reason(e)}") from None
    turns: list[dict] = []
    last = entries[-1]
    for entry in entries:
        if entry["turn"] == len(turns) + 1:  # a turn logged twice is taken once; a missing one ends the turns
            turns.append({key: entry[key] for key in ("turn", "question", "answer", "tokens", "media")})
            last = entry
        elif entry["turn"] is None or entry["turn"] > len(turns) + 1:
            break
    return {"conversation": newest["conversation"], "model": last["model"], "media": last["media"],
            "window": last["window"], "settings": last["settings"] or {}, "turns": turns, "time": last["time"]}
