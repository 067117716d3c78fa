"""A persistent cache of projected video features, so a new question about a known video skips decoding and
the vision tower.

An entry is keyed by the video file's content hash, the frame rule and count, and the model (checkpoint files
and dtype). Entries are safetensors files (nothing is unpickled) under `$XDG_CACHE_HOME/videoqa/features`;
the least recently used go first once the total passes `VIDEOQA_CACHE_MAX_MB` (default 4096).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from videoqa.frames import Frames

FRAME_RULE = "linspace(0,n-1,N)/v1"  # change when the frame sampling changes, to orphan old entries


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "videoqa" / "features"


def max_bytes() -> int:
    return int(os.environ.get("VIDEOQA_CACHE_MAX_MB", "4096")) * 2**20


def model_identity(path: Path, dtype) -> str:
    """What makes two runs compute the same features: the checkpoint's files as they are now, and the dtype."""
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([str(path.resolve()), stamps, str(dtype)])


def file_hash(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class FeatureCache:
    def __init__(self, model: str, directory: Path | None = None):
        self.model, self.dir = model, directory or cache_dir()
        self.keys: dict[tuple[Path, int], str] = {}  # hash each file once per process

    def key(self, video: Path, frames: int) -> str:
        if (video, frames) not in self.keys:
            parts = [file_hash(video), FRAME_RULE, str(frames), self.model]
            self.keys[video, frames] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return self.keys[video, frames]

    def get(self, video: Path, frames: int):
        """(Frames without pixels, features) of a cached video, or None."""
        from safetensors import safe_open

        file = self.dir / f"{self.key(video, frames)}.safetensors"
        try:
            with safe_open(file, framework="pt") as f:
                features, meta = f.get_tensor("features"), f.metadata()
        except Exception:  # absent, or damaged: recomputed and rewritten
            return None
        os.utime(file)  # recently used
        frames = Frames(pixels=None, indices=json.loads(meta["indices"]), times=json.loads(meta["times"]))
        return frames, features

    def put(self, video: Path, frames: Frames, features) -> None:
        from safetensors.torch import save_file

        key = self.key(video, len(frames.indices))
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.dir / f"{key}.partial"
        meta = {"indices": json.dumps(frames.indices), "times": json.dumps(frames.times)}
        save_file({"features": features.detach().cpu().contiguous()}, partial, metadata=meta)
        partial.replace(self.dir / f"{key}.safetensors")  # whole entries only
        evict(self.dir, max_bytes())


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"), key=lambda f: f.stat().st_mtime_ns) if directory.is_dir() else []


def evict(directory: Path, limit: int) -> None:
    """Delete the least recently used entries until the total fits `limit`."""
    files = entries(directory)
    total = sum(f.stat().st_size for f in files)
    for file in files:
        if total <= limit:
            break
        total -= file.stat().st_size
        file.unlink(missing_ok=True)


def info(directory: Path) -> dict:
    files = entries(directory)
    return {"directory": str(directory), "entries": len(files), "bytes": sum(f.stat().st_size for f in files),
            "max_bytes": max_bytes()}


def clear(directory: Path) -> int:
    files = entries(directory)
    for file in files:
        file.unlink(missing_ok=True)
    return len(files)

