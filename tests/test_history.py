"""The history (videoqa/history.py, `videoqa logs`, `chat --continue`): every ask answer and chat turn appended to
SQLite with its media hashes and settings; caption, timeline and eval only with --log; --no-log and VIDEOQA_LOG=0;
search by words (FTS5) and by a file's content; a history that cannot be written is one note and the answer
stands; an old schema is migrated; four processes at once lose no row; a conversation goes on from the log with
the tokens it would have had."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime

import pytest

from conftest import ASSETS, assert_clean_failure, asset, build_video_llava, needs_assets, run_videoqa
from videoqa import history
from videoqa.cache import file_hash
from videoqa.errors import Exit

pytestmark = needs_assets
VIDEO = "videos/videollava_sample_demo_1.mp4"
OTHER = "videos/videollava_sample_demo_9.mp4"
FAST = ("-n", 2, "--frames", 2)


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    """A tiny Video-LLaVA whose answers depend visibly on everything before them."""
    if not ASSETS.is_dir():
        pytest.skip("../shared/assets (the real tokenizer) is not beside the checkout")
    return build_video_llava(tmp_path_factory.mktemp("sensitive"), initializer_range=0.3)


def notes(result) -> list[str]:
    return [line for line in result.err.splitlines() if line.startswith("note:")]


def rows() -> int:
    if not history.path().exists():
        return 0
    with sqlite3.connect(history.path()) as db:
        return db.execute("SELECT count(*) FROM answers").fetchone()[0]


def test_the_history_lives_beside_chats_readline_history(tmp_path):
    from videoqa.chat import data_dir

    assert history.path() == data_dir() / "logs.db" == tmp_path / "data" / "videoqa" / "logs.db"


def test_ask_logs_a_row_with_every_field(cli, tiny_model):
    video = asset(VIDEO)
    result = cli("ask", video, "What happens?", "-m", tiny_model, *FAST, "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    streamed = cli("ask", video, "Why now?", "-m", tiny_model, *FAST, "--start", 1, "--end", 5, "--seed", 3)
    assert streamed.code == 0 and streamed.out.strip(), streamed
    second, first = history.recent()
    assert first["command"] == "ask" and first["model"] == str(tiny_model)
    assert first["media"] == [{"path": str(video), "hash": file_hash(video)}]
    assert first["window"] is None and second["window"] == {"start": 1.0, "end": 5.0}
    for field in ("question", "prompt", "answer", "tokens", "frames", "runtime", "timings", "warnings", "error"):
        assert first[field] == record[field], field
    assert len(first["tokens"]) == 2 and len(first["frames"]) == 2
    settings = first["settings"]
    assert settings["frames"] == 2 and settings["max_new_tokens"] == 2 and settings["temperature"] == 0.0
    assert settings["seed"] is None and second["settings"]["seed"] == 3
    assert second["question"] == "Why now?" and second["answer"] == streamed.out.strip()
    assert first["conversation"] is None and first["turn"] is None
    assert abs(datetime.fromisoformat(first["time"]).timestamp() - time.time()) < 120
    assert second["id"] > first["id"]


def test_chat_turns_share_a_conversation_id_and_count_turns(chat, tiny_model):
    result = chat(["Why?", "And then?", "/reset", "Why?"], asset(VIDEO), "-m", tiny_model, *FAST, "--json")
    assert result.code == 0, result
    third, second, first = history.recent()
    assert {first["command"], second["command"], third["command"]} == {"chat"}
    assert (first["turn"], second["turn"], third["turn"]) == (1, 2, 1)
    assert first["conversation"] == second["conversation"] != third["conversation"]  # /reset: a new conversation
    assert [json.loads(line)["tokens"] for line in result.out.splitlines()] == [
        first["tokens"], second["tokens"], third["tokens"]]
    assert second["prompt"] == "USER: And then? ASSISTANT:"


def test_no_log_and_videoqa_log_0_write_nothing(cli, chat, tiny_model, monkeypatch):
    assert cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, *FAST, "--no-log").code == 0
    assert chat(["Why?"], asset(VIDEO), "-m", tiny_model, *FAST, "--no-log").code == 0
    monkeypatch.setenv("VIDEOQA_LOG", "0")
    assert cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, *FAST).code == 0
    assert chat(["Why?"], asset(VIDEO), "-m", tiny_model, *FAST).code == 0
    assert not history.path().exists()
    monkeypatch.delenv("VIDEOQA_LOG")
    assert cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, *FAST).code == 0
    assert rows() == 1


def test_caption_timeline_and_eval_log_only_with_log(cli, tiny_model, tmp_path):
    videos = [asset(VIDEO), asset(OTHER)]
    assert cli("caption", *videos, "-m", tiny_model, *FAST, "--out", tmp_path / "a.jsonl").code == 0
    srt = tmp_path / "a.srt"
    assert cli("timeline", asset(VIDEO), "-m", tiny_model, *FAST, "--segments", 2, "--out", srt).code == 0
    assert not history.path().exists()

    result = cli("caption", *videos, "-m", tiny_model, *FAST, "--out", tmp_path / "b.jsonl", "--log", "--start", 1)
    assert result.code == 0, result
    written = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    logged = history.recent()[::-1]
    assert [e["command"] for e in logged] == ["caption", "caption"]
    assert [e["answer"] for e in logged] == [r["answer"] for r in written]
    assert [e["media"][0]["hash"] for e in logged] == [file_hash(v) for v in videos]
    assert all(e["window"] == {"start": 1.0, "end": None} and e["settings"]["max_new_tokens"] == 2 for e in logged)

    result = cli("timeline", asset(VIDEO), "-m", tiny_model, *FAST, "--segments", 2, "--out", tmp_path / "b.jsonl",
                 "--overwrite", "--log")
    assert result.code == 0, result
    segments = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    logged = [e for e in history.recent()[::-1] if e["command"] == "timeline"]
    assert [e["window"] for e in logged] == [{"start": s["start"], "end": s["end"]} for s in segments]
    assert logged[0]["window"]["start"] == 0.0  # a segment from the start is a window, not the whole video

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"video": VIDEO.split("/")[1], "question": "Sport?", "choices": ["golf", "tennis"],
                                 "answer": "golf", "start": 2, "end": 6}) + "\n")
    result = cli("eval", items, "--videos", asset("videos"), "-m", tiny_model, *FAST, "--out", tmp_path / "e.jsonl",
                 "--log")
    assert result.code == 0, result
    (judged,) = [e for e in history.recent() if e["command"] == "eval"]
    assert judged["question"] == "Sport?" and judged["answer"] in ("golf", "tennis")
    assert judged["window"] == {"start": 2.0, "end": 6.0}
    assert rows() == 2 + 2 + 1


def add(question: str, answer: str, media, **extra) -> None:
    """A row through the API, as a command would log it."""
    record = {"question": question, "answer": answer, "model": "m", "tokens": [1, 2], "frames": [], "timings": {}}
    history.log(record, command="ask", settings={"max_new_tokens": 2}, media=media, **extra)


def test_logs_lists_newest_first_as_text_or_json_and_searches_words(cli, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"a video's bytes")
    for n in range(12):
        add(f"question {n}?", f"answer number {n}" + (" with a skateboarding dog" if n == 4 else ""), [clip])
    listed = cli("logs")
    assert listed.code == 0, listed
    headings = [line for line in listed.out.splitlines() if line.startswith("#")]
    assert len(headings) == 10 and headings[0].startswith("#12  ") and headings[-1].startswith("#3  ")
    assert "Q: question 11?\nA: answer number 11\n" in listed.out and "clip.mp4" in headings[0]

    shown = cli("logs", "-n", 2, "--json")
    entries = [json.loads(line) for line in shown.out.splitlines()]
    assert [e["question"] for e in entries] == ["question 11?", "question 10?"]
    assert entries[0]["media"] == [{"path": str(clip), "hash": file_hash(clip)}]
    assert entries[0]["tokens"] == [1, 2] and entries[0]["settings"] == {"max_new_tokens": 2}
    assert len(cli("logs", "-n", 0, "--json").out.splitlines()) == 12

    found = [json.loads(line) for line in cli("logs", "--search", "skateboarding", "--json").out.splitlines()]
    assert [e["question"] for e in found] == ["question 4?"]
    assert len(cli("logs", "--search", "DOG skateboarding", "--json").out.splitlines()) == 1  # every word, any case
    assert cli("logs", "--search", "skateboarding cat", "--json").out == ""
    assert cli("logs", "--search", "question", "--json", "-n", 0).out.count("\n") == 12  # questions are indexed too
    odd = cli("logs", "--search", 'dog" OR "x -(', "--json")  # FTS5 syntax is taken as words, not parsed
    assert odd.code == 0 and odd.out == "", odd
    assert history.recent(3, search="answer")[0]["question"] == "question 11?"


def test_logs_video_finds_a_file_by_its_content_under_another_name(cli, tiny_model, tmp_path):
    clip, other = tmp_path / "clip.mp4", tmp_path / "other.mp4"
    shutil.copy(asset(VIDEO), clip)
    shutil.copy(asset(OTHER), other)
    for video in (clip, other, clip):
        assert cli("ask", video, f"What about {video.name}?", "-m", tiny_model, *FAST).code == 0
    renamed = tmp_path / "moved" / "renamed.mp4"
    renamed.parent.mkdir()
    clip.rename(renamed)
    found = [json.loads(line) for line in cli("logs", "--video", renamed, "--json").out.splitlines()]
    assert [e["question"] for e in found] == ["What about clip.mp4?"] * 2
    assert {e["media"][0]["path"] for e in found} == {str(clip)}  # logged under its old name
    both = cli("logs", "--video", other, "--search", "other.mp4", "--json")
    assert len(both.out.splitlines()) == 1
    assert_clean_failure(cli("logs", "--video", tmp_path / "nope.mp4"), Exit.INPUT, "nope.mp4")


@pytest.mark.parametrize("broken", ["file for the folder", "folder for the file", "garbage bytes"])
def test_a_history_that_cannot_be_written_is_one_note_and_the_answer_stands(cli, chat, tiny_model, tmp_path, broken):
    data = tmp_path / "data" / "videoqa"
    if broken == "file for the folder":
        data.parent.mkdir(parents=True)
        data.write_text("not a folder")
    elif broken == "folder for the file":
        (data / "logs.db").mkdir(parents=True)
    else:
        data.mkdir(parents=True)
        (data / "logs.db").write_bytes(os.urandom(8192))
    result = cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, *FAST, "--json")
    assert result.code == 0, result
    assert json.loads(result.out)["answer"] is not None
    (note,) = notes(result)
    assert "history" in note and "logs.db" in note and "Traceback" not in result.err
    talk = chat(["Why?", "And then?"], asset(VIDEO), "-m", tiny_model, *FAST, "--json")
    assert talk.code == 0 and len(talk.out.splitlines()) == 2, talk
    assert len(notes(talk)) <= 1  # once per process at most (this one has said it already)
    if broken == "garbage bytes":
        assert_clean_failure(cli("logs"), Exit.USAGE, "history", "logs.db")


def test_a_real_process_with_a_corrupt_history_prints_its_answer_and_one_note(tiny_model, tmp_path):
    (tmp_path / "data" / "videoqa").mkdir(parents=True)
    history.path().write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    done = run_videoqa("ask", asset(VIDEO), "Why?", "-m", tiny_model, *FAST)
    assert done.returncode == 0 and done.stdout.strip(), done
    said = [line for line in done.stderr.decode().splitlines() if line.startswith("note:")]
    assert len(said) == 1 and "history" in said[0], done.stderr


V1 = [  # the schema as version 1 created it, frozen here: the migration must take such a file as it is
    "CREATE TABLE answers (id INTEGER PRIMARY KEY, time TEXT NOT NULL, command TEXT NOT NULL, model TEXT, "
    "window_start REAL, window_end REAL, question TEXT NOT NULL DEFAULT '', prompt TEXT, answer TEXT NOT NULL "
    "DEFAULT '', tokens TEXT, frames TEXT, settings TEXT, timings TEXT, warnings TEXT, error TEXT, conversation TEXT, "
    "turn INTEGER)",
    "CREATE TABLE media (answer INTEGER NOT NULL REFERENCES answers(id) ON DELETE CASCADE, position INTEGER NOT "
    "NULL, path TEXT NOT NULL, hash TEXT, PRIMARY KEY (answer, position))",
    "CREATE INDEX media_hash ON media(hash)",
    "CREATE INDEX answers_conversation ON answers(conversation, turn)",
    "CREATE VIRTUAL TABLE answers_fts USING fts5(question, answer, content='answers', content_rowid='id')",
    "CREATE TRIGGER answers_inserted AFTER INSERT ON answers BEGIN INSERT INTO answers_fts(rowid, question, answer) "
    "VALUES (new.id, new.question, new.answer); END",
    "CREATE TRIGGER answers_deleted AFTER DELETE ON answers BEGIN INSERT INTO answers_fts(answers_fts, rowid, "
    "question, answer) VALUES ('delete', old.id, old.question, old.answer); END",
    "CREATE TRIGGER answers_updated AFTER UPDATE OF question, answer ON answers BEGIN INSERT INTO "
    "answers_fts(answers_fts, rowid, question, answer) VALUES ('delete', old.id, old.question, old.answer); INSERT "
    "INTO answers_fts(rowid, question, answer) VALUES (new.id, new.question, new.answer); END",
]


def test_a_version_1_history_is_migrated_and_keeps_its_rows(cli, tiny_model, tmp_path):
    history.path().parent.mkdir(parents=True)
    with sqlite3.connect(history.path()) as db:
        for statement in V1:
            db.execute(statement)
        db.execute("INSERT INTO answers (time, command, model, question, answer, tokens, settings) VALUES "
                   "('2024-05-01T10:00:00.000+00:00', 'ask', 'video-llava-7b', 'Where is the kangaroo?', "
                   "'On the trampoline.', '[1, 2]', '{\"frames\": 8}')")
        db.execute("INSERT INTO media VALUES (1, 0, '/videos/old.mp4', 'abc')")
        db.execute("PRAGMA user_version = 1")
    db.close()

    assert cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, *FAST).code == 0
    new, old = history.recent()
    assert old["question"] == "Where is the kangaroo?" and old["settings"] == {"frames": 8}
    assert old["media"] == [{"path": "/videos/old.mp4", "hash": "abc"}] and old["runtime"] is None
    assert new["runtime"]["device"] == "cpu"  # the column version 2 added
    assert [e["id"] for e in history.recent(search="trampoline")] == [old["id"]]  # its index kept
    with sqlite3.connect(history.path()) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == history.VERSION == 2
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_history_from_a_newer_videoqa_is_left_alone(cli, capsys):
    from videoqa.render import show_notes

    history.path().parent.mkdir(parents=True)
    with sqlite3.connect(history.path()) as db:
        db.execute("CREATE TABLE answers (id INTEGER PRIMARY KEY, future TEXT)")
        db.execute("PRAGMA user_version = 99")
    db.close()
    show_notes()  # the "videoqa" logger's warnings as notes on stderr, as the CLI shows them
    add("Q?", "A.", [])
    add("Q?", "A.", [])
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(said) == 1 and "newer videoqa" in said[0]  # once per process
    assert_clean_failure(cli("logs"), Exit.USAGE, "newer videoqa")
    with sqlite3.connect(history.path()) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 99
        assert db.execute("SELECT count(*) FROM answers").fetchone()[0] == 0
    db.close()


APPEND = """
import sys, time
from videoqa import history
worker, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:  # every writer begins at once, on a database none has created yet
    time.sleep(0.001)
for n in range(25):
    history.log({"question": f"worker {worker} row {n}", "answer": "x", "model": "m"}, command="test",
                settings={})
"""


def test_four_processes_at_once_lose_no_row(tiny_model):
    start = time.time() + 1.5
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    appenders = [subprocess.Popen([sys.executable, "-c", APPEND, str(w), str(start)], stderr=subprocess.PIPE, env=env)
                 for w in range(4)]
    asks = [subprocess.Popen([sys.executable, "-m", "videoqa", "ask", asset(VIDEO), f"Question {w}?", "-m", tiny_model,
                              *map(str, FAST), "--no-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            for w in range(4)]
    for process in appenders + asks:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
        assert b"note:" not in err, err.decode()[-2000:]
    logged = [e["question"] for e in history.recent(0)]
    expected = [f"worker {w} row {n}" for w in range(4) for n in range(25)] + [f"Question {w}?" for w in range(4)]
    assert sorted(logged) == sorted(expected)  # every row, each once


def test_restore_rebuilds_the_conversation_without_generating(sensitive):
    import videoqa

    model = videoqa.load(sensitive, device="cpu", dtype="float32")
    talk = model.chat(asset(VIDEO), frames=2)
    first = talk.ask("Why is this funny?", max_new_tokens=4)
    ids_after_first = list(talk.ids)
    second = talk.ask("What is the baby holding?", max_new_tokens=4)

    again = model.chat(asset(VIDEO), frames=2)
    again.restore([("Why is this funny?", first.tokens)])
    assert again.ids == ids_after_first and again.cache is None
    assert [a.text for a in again.answers] == [first.text] and again.answers[0].prompt == first.prompt
    follow = again.ask("What is the baby holding?", max_new_tokens=4)
    assert follow.tokens == second.tokens
    assert follow.timings["prefill_tokens"] == len(again.ids) - len(follow.tokens)  # the whole conversation


def test_chat_continue_goes_on_with_the_same_tokens(chat, sensitive, tmp_path):
    q1, q2, q3 = "Why is this funny?", "What is the baby holding?", "Who laughs?"
    options = ("-m", sensitive, "-n", 4, "--frames", 2, "--dtype", "float32", "--json")
    whole = chat([q1, q2, q3], asset(VIDEO), *options)
    assert whole.code == 0, whole
    uninterrupted = [json.loads(line) for line in whole.out.splitlines()]
    clip = tmp_path / "clip.mp4"
    shutil.copy(asset(VIDEO), clip)
    assert chat([q1, q2], clip, *options).code == 0
    talked = history.recent(2)

    continued = chat([q3], "--continue", "--json", "--dtype", "float32")  # its model, frames and -n from the log
    assert continued.code == 0, continued
    (turn,) = [json.loads(line) for line in continued.out.splitlines()]
    assert turn["tokens"] == uninterrupted[2]["tokens"] and turn["turn"] == 3
    assert turn["video"] == str(clip) and len(turn["frames"]) == 2
    alone = chat([q3], clip, *options)  # the restored turns are what the answer depends on
    assert json.loads(alone.out)["tokens"] != turn["tokens"]
    (said,) = notes(continued)
    assert "2 turns" in said

    logged = [e for e in history.recent(0) if e["conversation"] == talked[0]["conversation"]]
    assert [e["turn"] for e in logged] == [3, 2, 1]  # the conversation goes on under its id

    assert_clean_failure(chat([q3], "--continue", clip), Exit.USAGE, "no video")
    assert_clean_failure(chat([q3], "--continue", "--frames", 4), Exit.USAGE, "--frames")
    assert_clean_failure(chat([q3], "--continue", "-m", tmp_path / "other"), Exit.USAGE, str(sensitive))
    clip.unlink()
    chat([q1], asset(VIDEO), *options, "--no-log")
    assert_clean_failure(chat([q3], "--continue"), Exit.INPUT, "clip.mp4", "gone")


def test_chat_continue_adds_back_the_files_the_conversation_brought(chat, sensitive):
    image, video = asset("images/videollava_desert.jpg"), asset(VIDEO)
    q1, q2, q3 = "What is in the picture?", "Why is this video funny?", "Who laughs?"
    options = ("-m", sensitive, "-n", 4, "--frames", 2, "--dtype", "float32", "--json")
    whole = chat([q1, f"/add {video}", q2, q3], image, *options)
    assert whole.code == 0, whole
    uninterrupted = [json.loads(line) for line in whole.out.splitlines()]
    assert chat([q1, f"/add {video}", q2], image, *options).code == 0
    first, second = reversed(history.recent(2))
    assert [m["path"] for m in first["media"]] == [str(image)]  # each turn logs the files it was about
    assert [m["path"] for m in second["media"]] == [str(image), str(video)]
    assert second["media"][1]["hash"] == file_hash(video)

    continued = chat([q3], "--continue", "--json", "--dtype", "float32")
    assert continued.code == 0, continued
    (turn,) = [json.loads(line) for line in continued.out.splitlines()]
    assert turn["tokens"] == uninterrupted[2]["tokens"] and turn["turn"] == 3
    assert turn["media"] == [str(image), str(video)] and len(turn["frames"]) == 2
    # found by the video's content: the turns about it, newest first (this conversation's, then the first run's)
    assert [e["turn"] for e in history.recent(0, video=video)] == [3, 2, 3, 2]


def test_chat_continue_with_no_conversation_logged(chat, cli, tiny_model):
    assert_clean_failure(chat(["Why?"], "--continue"), Exit.USAGE, "no chat conversation")
    assert cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, *FAST).code == 0  # an ask is no conversation
    assert_clean_failure(chat(["Why?"], "--continue"), Exit.USAGE, "no chat conversation")
