"""`videoqa models`: every preset, whether it is downloaded, and the memory an 8-frame question needs with it at
each precision, against what this machine's best device has free now."""

from __future__ import annotations

from videoqa import memory, models

PRECISIONS = {"float16": ("none", 2), "bfloat16": ("none", 2), "int8": ("int8", 2), "nf4": ("nf4", 2)}


def disk_size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())  # the snapshot's links resolve to blobs


def estimates(preset, path, device) -> dict[str, memory.Estimate]:
    """Per precision: from the checkpoint's headers and config when it is downloaded, else the preset's table."""
    from videoqa.session import Checkpoint

    found = Checkpoint(str(path) if path else preset.name, device=device.type, check_memory=False, cache=False)
    if path is not None:
        found.resolve()
    return {name: found.estimate(quantize=q, dtype_bytes=b) for name, (q, b) in PRECISIONS.items()}


def rows(device_name: str = "auto") -> tuple[list[dict], str]:
    """One row per preset, and the device that "fits" was judged against."""
    device = models.pick_device(device_name)
    have, where = memory.free(device)
    found = []
    for preset in models.presets().values():
        path = models.cached(preset.repo, preset.revision)
        needs = estimates(preset, path, device)
        found.append({
            "name": preset.name, "architecture": preset.family.name, "repo": preset.repo,
            "cached": path is not None, "disk_bytes": disk_size(path) if path else 0,
            "memory_bytes": {name: round(e.total) for name, e in needs.items()},
            "fits": {name: e.total <= have for name, e in needs.items()},
        })
    return found, f"{where}, {memory.size(have)} free"
