"""The persistent feature cache: a known video skips decoding and the vision tower; LRU bound; info/clear."""

import json
import os
import subprocess
import sys

import pytest

from conftest import assert_clean_failure, asset, needs_assets
from videoqa.cache import cache_dir, evict

VIDEO = "videos/videollava_sample_demo_1.mp4"


class Work:
    """Counts of frame decodes and vision-tower runs, as a dict that compares like {"frames": n, "tower": m}."""

    def __init__(self, counted):
        self.counted = counted

    def __getitem__(self, key):
        return self.counted["frames"] if key == "frames" else len(self.counted["towers"])

    def __eq__(self, other):
        return {"frames": self["frames"], "tower": self["tower"]} == other

    def __repr__(self):
        return repr({"frames": self["frames"], "tower": self["tower"]})


@pytest.fixture
def work(counted):
    return Work(counted)


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
               "-m", str(tiny_model), "-n", "8", "--json", "--dtype", "float32"]
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


def entry_parts(entry) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and tensor bytes (the format: an 8-byte little-endian header length)."""
    raw = entry.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_entry(entry, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it
    entry.write_bytes(len(text).to_bytes(8, "little") + text + data)


@needs_assets
def test_damaged_tensor_bytes_are_recomputed_and_the_entry_replaced(cli, tiny_model, work):
    first = ask(cli, tiny_model)
    (entry,) = cache_dir().glob("*.safetensors")
    good = entry_parts(entry)
    raw = bytearray(entry.read_bytes())
    middle = len(raw) - len(good[1]) // 2  # inside the tensor data; the header stays intact
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    entry.write_bytes(raw)
    assert ask(cli, tiny_model)["tokens"] == first["tokens"] and work["tower"] == 2  # not used: recomputed
    assert entry_parts(entry) == good  # and replaced by a good entry,
    assert ask(cli, tiny_model)["tokens"] == first["tokens"] and work["tower"] == 2  # which is used


def _meta(header: dict, **changes) -> dict:
    meta = {k: v for k, v in {**header["__metadata__"], **changes}.items() if v is not None}
    return {**header, "__metadata__": meta}


def _features(header: dict, **changes) -> dict:
    return {**header, "features": {**header["features"], **changes}}


DAMAGES = {
    "metadata not JSON": lambda h: _meta(h, indices="[0, 1,"),
    "a metadata key missing": lambda h: _meta(h, times=None),
    "metadata of the wrong type": lambda h: _meta(h, indices='"eight"'),
    "metadata of the wrong length": lambda h: _meta(h, times="[0.0]"),
    "no metadata": lambda h: {k: v for k, v in h.items() if k != "__metadata__"},
    "features of another shape": lambda h: _features(h, shape=h["features"]["shape"][::-1]),
    "features of another dtype": lambda h: _features(h, dtype="I32"),
}


@needs_assets
@pytest.mark.parametrize("damage", DAMAGES)
def test_an_entry_not_exactly_as_written_is_recomputed(cli, tiny_model, work, damage):
    first = ask(cli, tiny_model)
    (entry,) = cache_dir().glob("*.safetensors")
    header, data = good = entry_parts(entry)
    write_entry(entry, DAMAGES[damage](header), data)
    second = ask(cli, tiny_model)
    assert second["tokens"] == first["tokens"] and second["frames"] == first["frames"] and work["tower"] == 2
    assert entry_parts(entry) == good


@needs_assets
def test_an_entry_removed_as_it_is_read_is_still_used(cli, tiny_model, work, monkeypatch):
    first = ask(cli, tiny_model)

    def removed(path, *args, **kwargs):  # another process cleared the cache just after this one read the entry
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(os, "utime", removed)
    assert ask(cli, tiny_model)["tokens"] == first["tokens"] and work["tower"] == 1


def fake_entries(count: int) -> None:
    cache_dir().mkdir(parents=True)
    for i in range(count):
        (cache_dir() / f"{i:03}.safetensors").write_bytes(b"x" * 1000)


def after_listing(monkeypatch, action) -> list:
    """Run `action(files)` once, right after this process lists the entries, as if another process ran then;
    returns the list that will hold what it returned."""
    from videoqa import cache

    real, done = cache.entries, []

    def listed(directory, pattern="*.safetensors"):
        files = real(directory, pattern)
        if pattern == "*.safetensors" and not done:
            done.append(action(files))
        return files

    monkeypatch.setattr(cache, "entries", listed)
    return done


def clear_in_another_process(files) -> str:
    command = [sys.executable, "-m", "videoqa", "cache", "clear"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_cache_info_while_another_process_clears(cli, monkeypatch):
    fake_entries(20)
    cleared = after_listing(monkeypatch, clear_in_another_process)
    result = cli("cache", "info")
    assert result.code == 0 and cleared == ["removed 20 entries\n"], result
    assert "entries    0\n" in result.out and "size       0.0 MiB" in result.out


def test_two_concurrent_clears_remove_each_entry_once(cli, monkeypatch):
    fake_entries(20)
    cleared = after_listing(monkeypatch, clear_in_another_process)
    result = cli("cache", "clear")
    assert cleared == ["removed 20 entries\n"] and result.out == "removed 0 entries\n"


def test_eviction_tolerates_entries_another_process_removes(tmp_path, monkeypatch):
    for i, name in enumerate(["old", "middle", "new"]):
        entry = tmp_path / f"{name}.safetensors"
        entry.write_bytes(b"x" * 100)
        os.utime(entry, ns=(i * 10**9, i * 10**9))
    after_listing(monkeypatch, lambda files: files[0].unlink())  # "old" goes meanwhile
    evict(tmp_path, 150)
    assert [f.stem for f in tmp_path.glob("*")] == ["new"]


@pytest.mark.parametrize("value", ["lots", "²", "-5", "1e3", "1_000", "+5", "12 MB", "9" * 19, "9" * 5000])
def test_every_bad_cache_bound_is_a_usage_error_for_cache_info(cli, monkeypatch, value):
    monkeypatch.setenv("VIDEOQA_CACHE_MAX_MB", value)
    assert_clean_failure(cli("cache", "info"), 2, "VIDEOQA_CACHE_MAX_MB", "whole number of MiB")


@pytest.mark.parametrize("value, shown", [(" 12 ", "12"), ("", "4096"), ("0", "0"), ("9" * 18, "9" * 18)])
def test_cache_bounds_that_are_accepted(cli, monkeypatch, value, shown):
    monkeypatch.setenv("VIDEOQA_CACHE_MAX_MB", value)
    result = cli("cache", "info")
    assert result.code == 0 and f"of {shown} MiB\n" in result.out, result


@needs_assets
def test_ask_with_a_bad_cache_bound_notes_it_and_keeps_the_default(cli, tiny_model, monkeypatch):
    monkeypatch.setenv("VIDEOQA_CACHE_MAX_MB", "²")
    result = cli("ask", asset(VIDEO), "Why?", "-m", tiny_model, "-n", 2, "--json", "--no-compile")
    assert result.code == 0 and len(json.loads(result.out)["tokens"]) == 2, result
    (line,) = result.err.splitlines()
    assert line.startswith("note: VIDEOQA_CACHE_MAX_MB='²'") and "default, 4096 MiB" in line
    assert len(list(cache_dir().glob("*.safetensors"))) == 1


def hashes(monkeypatch) -> list:
    """The files hashed for a cache key from now on (not read: the hash is made up)."""
    from videoqa import cache

    hashed = []
    monkeypatch.setattr(cache, "file_hash", lambda path: hashed.append(path) or "0" * 64)
    return hashed


def sparse_non_video(tmp_path):
    big = tmp_path / "big.mp4"
    with big.open("wb") as f:
        f.truncate(20 * 2**30)  # sparse: 20 GB that take no disk, but a minute to read and hash
    return big


@needs_assets
def test_a_file_that_is_not_a_video_is_refused_before_it_is_hashed(cli, tiny_model, tmp_path, monkeypatch):
    hashed = hashes(monkeypatch)
    assert_clean_failure(cli("ask", sparse_non_video(tmp_path), "What?", "-m", tiny_model), 3, "not a readable video")
    assert hashed == []
    ask(cli, tiny_model, "--no-log")  # the feature cache's hashing alone (the history asks for the same hash)
    assert hashed == [asset(VIDEO)]  # a video is hashed (once), after it opened


@needs_assets
def test_chat_refuses_a_file_that_is_not_a_video_before_hashing_it(cli, tiny_model, tmp_path, monkeypatch):
    import io

    hashed = hashes(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {sparse_non_video(tmp_path)}\n"))
    result = cli("chat", "-m", tiny_model, "--no-compile")
    assert result.code == 3 and "not a readable video" in result.err and hashed == [], result


def test_clear_and_info_pass_over_what_is_no_entry(cli):
    """A folder or a loop of links under an entry's name is not an entry: not counted, not removed, no crash."""
    fake_entries(2)
    (cache_dir() / "folder.safetensors").mkdir()
    (cache_dir() / "loop.safetensors").symlink_to("loop.safetensors")
    shown = cli("cache", "info")
    assert shown.code == 0 and "entries    2\n" in shown.out, shown
    cleared = cli("cache", "clear")
    assert cleared.code == 0 and cleared.out == "removed 2 entries\n", cleared
