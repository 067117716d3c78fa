"""The persistent feature cache: a known video skips decoding and the vision tower; LRU bound; info/clear."""

import json
import os
import subprocess
import sys

import pytest

from conftest import asset, needs_assets
from videoqa.cache import cache_dir, evict

VIDEO = "videos/videollava_sample_demo_1.mp4"


@pytest.fixture
def work(monkeypatch):
    """Counts of frame decodes and vision-tower runs."""
    from videoqa import conversation

    calls = {"frames": 0, "tower": 0}
    real_read, real_tower = conversation.read_media, conversation.video_features

    def read_media(*args):
        calls["frames"] += 1
        return real_read(*args)

    def video_features(*args):
        calls["tower"] += 1
        return real_tower(*args)

    monkeypatch.setattr(conversation, "read_media", read_media)
    monkeypatch.setattr(conversation, "video_features", video_features)
    return calls


def ask(cli, model, *extra):
    result = cli("ask", asset(VIDEO), "Why is this video funny?", "-m", model, "-n", 8, "--json", *extra)
    assert result.code == 0, result
    return json.loads(result.out)


@needs_assets
def test_second_question_skips_decoding_and_the_tower(cli, tiny_model, work):
    first = ask(cli, tiny_model)
    assert work == {"frames": 1, "tower": 1} and len(list(cache_dir().glob("*.safetensors"))) == 1
    second = ask(cli, tiny_model)
    assert work == {"frames": 1, "tower": 1}  # nothing decoded, no tower run
    assert second["tokens"] == first["tokens"] and second["frames"] == first["frames"]
    other = cli("ask", asset(VIDEO), "Other?", "-m", tiny_model, "-n", 2, "--frames", 4, "--json")
    assert other.code == 0 and work == {"frames": 2, "tower": 2}  # another frame count is another entry


@needs_assets
def test_no_cache_neither_reads_nor_writes(cli, tiny_model, work):
    ask(cli, tiny_model, "--no-cache")
    ask(cli, tiny_model, "--no-cache")
    assert work == {"frames": 2, "tower": 2} and not cache_dir().exists()


@needs_assets
def test_a_damaged_entry_is_recomputed(cli, tiny_model, work):
    first = ask(cli, tiny_model)
    (entry,) = cache_dir().glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    assert ask(cli, tiny_model)["tokens"] == first["tokens"] and work["tower"] == 2


@needs_assets
def test_chat_uses_the_cache_too(cli, tiny_model, work, monkeypatch):
    import io

    ask(cli, tiny_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Why?\n/video {asset(VIDEO)}\nWhy?\n"))
    assert cli("chat", asset(VIDEO), "-m", tiny_model, "-n", 2, "--json").code == 0
    assert work == {"frames": 1, "tower": 1}


@needs_assets
def test_a_new_process_gets_the_same_answer_from_the_cache(cli, tiny_model):
    first = ask(cli, tiny_model)
    command = [sys.executable, "-m", "videoqa", "ask", str(asset(VIDEO)), "Why is this video funny?",
               "-m", str(tiny_model), "-n", "8", "--json"]
    out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=True).stdout
    second = json.loads(out)
    assert second["tokens"] == first["tokens"] and second["timings"]["frames"] < first["timings"]["frames"]


def test_least_recently_used_entries_go_first(tmp_path):
    for i, name in enumerate(["old", "middle", "new"]):
        entry = tmp_path / f"{name}.safetensors"
        entry.write_bytes(b"x" * 100)
        os.utime(entry, ns=(i * 10**9, i * 10**9))
    evict(tmp_path, 250)  # 300 bytes held: the oldest goes
    assert sorted(f.stem for f in tmp_path.glob("*")) == ["middle", "new"]
    evict(tmp_path, 100)
    assert [f.stem for f in tmp_path.glob("*")] == ["new"]


@needs_assets
def test_cache_info_and_clear(cli, tiny_model, monkeypatch):
    ask(cli, tiny_model)
    monkeypatch.setenv("VIDEOQA_CACHE_MAX_MB", "7")
    info = cli("cache", "info")
    assert info.code == 0 and "entries    1" in info.out and str(cache_dir()) in info.out and "of 7 MiB" in info.out
    cleared = cli("cache", "clear")
    assert cleared.out.strip() == "removed 1 entries" and not list(cache_dir().glob("*.safetensors"))


@needs_assets
def test_an_unusable_cache_is_a_note_not_a_failure(cli, tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache dir cannot be created under a file
    result = cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, "-n", 2, "--json", "--no-compile")
    assert result.code == 0 and len(json.loads(result.out)["tokens"]) == 2
    assert result.err.startswith("note: the feature cache") and "not written" in result.err


def test_a_bad_cache_bound_is_a_usage_error(cli, monkeypatch):
    monkeypatch.setenv("VIDEOQA_CACHE_MAX_MB", "lots")
    result = cli("cache", "info")
    assert result.code == 2 and "VIDEOQA_CACHE_MAX_MB" in result.err and result.out == ""
