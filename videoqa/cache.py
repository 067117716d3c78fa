"""A persistent cache of projected video features, so a new question about a known video skips decoding and
the vision tower.

An entry is keyed by the video file's content hash, the frame rule and count, the time window the frames were
sampled from, and the model (checkpoint files and dtype). Entries are safetensors files (nothing is unpickled) under `$XDG_CACHE_HOME/videoqa/features`, each with a
sha256 of its contents and key, checked on every read: an entry not exactly as written is a miss, recomputed and
replaced. The least recently used go first once the total passes `VIDEOQA_CACHE_MAX_MB` (default 4096). Other
processes may read, write, evict or clear the cache at any time: a file may vanish between any two steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import suppress
from pathlib import Path
from stat import S_ISREG

from videoqa.errors import VideoQAError
from videoqa import frames as framing
from videoqa.frames import Frames, Rule, Sampler
from videoqa.windows import WHOLE, Window

FRAME_RULE = "linspace(0,n-1,N)/v2"  # change when the frame sampling changes, to orphan old entries (v2: PyAV)
DEFAULT_MAX_MB = 4096


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "videoqa" / "features"


def max_bytes() -> int:
    """The bound in VIDEOQA_CACHE_MAX_MB: ASCII digits, surrounding blanks ignored; unset or empty, the default.

    Matched by a pattern: `str.isdigit` also takes digits `int` refuses ('²'), and `int` takes '+5' and '1_000'.
    18 digits at most: a bound far past any disk, and one `cache info` can print.
    """
    value = os.environ.get("VIDEOQA_CACHE_MAX_MB", "").strip()
    if not value:
        return DEFAULT_MAX_MB * 2**20
    if not re.fullmatch(r"[0-9]{1,18}", value):
        shown = value if len(value) <= 20 else f"{value[:20]}…"
        raise VideoQAError(f"VIDEOQA_CACHE_MAX_MB={shown!r}: give the cache's bound as a whole number of MiB "
                           "(at most 18 digits)")
    return int(value) * 2**20


def model_identity(path: Path, dtype) -> str:
    """What makes two runs compute the same features: the checkpoint's files as they are now, and the dtype."""
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([str(path.resolve()), stamps, str(dtype)])


_HASHES: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a file read whole once per process


def file_hash(path: Path) -> str:
    """The sha256 of a file's bytes, read once per process while its size and time stay the same (the feature
    cache's key and the history's record of a video ask for it both)."""
    status = path.stat()
    seen = (os.path.abspath(path), status.st_size, status.st_mtime_ns)
    if seen not in _HASHES:
        with path.open("rb") as f:
            _HASHES[seen] = hashlib.file_digest(f, "sha256").hexdigest()
    return _HASHES[seen]


class FeatureCache:
    def __init__(self, model: str, limit: int, directory: Path | None = None):
        self.model, self.limit, self.dir = model, limit, directory or cache_dir()  # limit: bytes, from max_bytes()
        self.keys: dict[tuple, str] = {}  # hash each file once per process, while it stays the same

    def key(self, video: Path, frames: Rule, window: Window = WHOLE) -> str:
        stat = video.stat()
        seen = (video, stat.st_size, stat.st_mtime_ns, frames, window)
        if seen not in self.keys:
            parts = [file_hash(video), FRAME_RULE, str(frames), window.key(), self.model]
            self.keys[seen] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return self.keys[seen]

    def get(self, video: Path, frames: Rule, window: Window = WHOLE):
        """(Frames without pixels, features) of a cached video, or None: absent, or not exactly as written (the
        caller then recomputes it and `put` replaces it). The frames keep the warnings they were read with."""
        key = self.key(video, frames, window)
        file = self.dir / f"{key}.safetensors"
        entry = read_entry(file, key)
        if entry is None:
            return None
        from videoqa.features import Visual

        tensors, meta = entry
        with suppress(OSError):  # another process may remove the entry meanwhile; it has been read whole
            os.utime(file)  # recently used
        times = json.loads(meta["times"])
        layers = tuple(tensors[f"layer.{i}"] for i in range(sum(name.startswith("layer.") for name in tensors)))
        features = Visual(tensors["features"], tensors.get("grid"), layers, tuple(times))
        return Frames(pixels=None, indices=json.loads(meta["indices"]), times=times,
                      warnings=json.loads(meta["warnings"]), window=window, rule=frames), features

    def put(self, video: Path, frames: Frames, features) -> str | None:
        """Store an entry (the features' rows, grid and DeepStack layers); the cache is an optimisation, so a
        failure is returned as a reason, not raised."""
        from safetensors.torch import save_file

        key = self.key(video, len(frames.indices) if frames.rule is None else frames.rule, frames.window)
        tensors = {"features": features.rows, **({} if features.grid is None else {"grid": features.grid}),
                   **{f"layer.{i}": layer for i, layer in enumerate(features.layers)}}
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        meta = {"indices": json.dumps(frames.indices), "times": json.dumps(frames.times),
                "warnings": json.dumps(frames.warnings)}
        meta["sha256"] = checksum(key, tensors, meta)
        partial = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=self.dir, suffix=".partial")  # one per writer
            os.close(fd)
            save_file(tensors, partial, metadata=meta)
            os.replace(partial, self.dir / f"{key}.safetensors")  # whole entries only
            evict(self.dir, self.limit)
        except OSError as e:
            if partial is not None:
                Path(partial).unlink(missing_ok=True)
            return f"the feature cache in {self.dir} was not written ({e.strerror or e})"
        return None


def checksum(key: str, tensors: dict, meta: dict[str, str]) -> str:
    """sha256 of everything an entry holds, and of its key: an entry is used only exactly as it was written, under
    the name it was written to. (A safetensors header checks lengths, not bytes: damaged data would read fine.)"""
    import torch

    named = sorted(tensors.items())  # tensors and metadata come back in any order: sorted
    facts = [key, [(name, str(t.dtype), list(t.shape)) for name, t in named], meta]
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    for _, tensor in named:
        digest.update(tensor.contiguous().view(torch.uint8).numpy())  # the tensor's bytes, whatever its dtype
    return digest.hexdigest()


def read_entry(file: Path, key: str):
    """An entry's features and metadata (less its checksum), or None: absent, unreadable, or not as written."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            tensors, meta = {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except Exception:  # absent, or a damaged header
        return None
    if "features" not in tensors or meta.pop("sha256", None) != checksum(key, tensors, meta):  # damaged, or
        return None  # another entry's
    return tensors, meta


def entries(directory: Path, pattern: str = "*.safetensors") -> list[Path]:
    """Entries, least recently used first (one that another process deletes meanwhile is left out)."""
    stamped = []
    for file in directory.glob(pattern) if directory.is_dir() else []:
        try:
            found = file.stat()
        except OSError:  # gone meanwhile, or a loop of links: no entry
            continue
        if S_ISREG(found.st_mode):  # a folder or a device under an entry's name is none either
            stamped.append((found.st_mtime_ns, file))
    return [file for _, file in sorted(stamped)]


def sizes(files: list[Path]) -> list[tuple[Path, int]]:
    """The files that still exist, with their sizes: another process may remove any of them at any time."""
    sized = []
    for file in files:
        try:
            sized.append((file, file.stat().st_size))
        except OSError:
            continue
    return sized


def evict(directory: Path, limit: int) -> None:
    """Delete the least recently used entries until the total fits `limit`."""
    sized = sizes(entries(directory))
    total = sum(size for _, size in sized)
    for file, size in sized:
        if total <= limit:
            break
        total -= size
        with suppress(OSError):  # gone already, or not ours to delete: the bound is best effort
            file.unlink()


def info(directory: Path) -> dict:
    """What the cache holds now: entries that vanish while it is looked at (another process clearing it) are
    not counted."""
    limit = max_bytes()
    sized = sizes(entries(directory))
    return {"directory": str(directory), "entries": len(sized), "bytes": sum(size for _, size in sized),
            "max_bytes": limit}


def clear(directory: Path) -> int:
    """Delete every entry, and the temporary files of writes that never finished. Returns how many entries this
    process removed: with two `clear`s at once, each entry counts for the one whose unlink succeeded."""
    removed = sum(remove(file) for file in entries(directory))
    for file in entries(directory, "*.partial"):
        remove(file)
    return removed


def remove(file: Path) -> bool:
    """Delete `file`; False if another process did first. A file this user may not delete is an error (exit code
    2), named."""
    try:
        file.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise VideoQAError(f"{file}: cannot remove it ({e.strerror})") from None
    return True


def open_cache(path: Path, dtype) -> FeatureCache:
    """The model's feature cache. A bad VIDEOQA_CACHE_MAX_MB is a notice and the default bound here, not a failure:
    the cache only saves time (`cache info`, which is about the cache, refuses it)."""
    import logging

    try:
        limit = max_bytes()
    except VideoQAError as e:
        logging.getLogger("videoqa").warning(f"{e}; using the default, {DEFAULT_MAX_MB} MiB")
        limit = DEFAULT_MAX_MB * 2**20
    return FeatureCache(model_identity(path, dtype), limit)


def read_video(path: Path, sampler: Sampler, cache: FeatureCache | None, window: Window = WHOLE):
    """(Frames, features) of a video (or a `window` of it) the cache knows (then no frame is decoded), else
    (Frames, None); the frames chosen by the rule `sampler` gives for the video's frame size.

    The video is opened before it is hashed for the cache's key: a file that is not a video is refused at once,
    not after being read whole (a minute for 20 GB). On a miss the frames are read through that same reader.
    """
    with framing.open_video(path) as video:
        frames = sampler(video.size)
        if cache is not None:
            hit = cache.get(path, frames, window)
            if hit is not None:
                return hit
        return framing.read_frames(path, frames, video, window=window), None
