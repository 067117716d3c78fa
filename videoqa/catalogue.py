"""`videoqa models`: every preset, whether it is downloaded, and the memory a default question (the preset's
frames, 256 new tokens) needs with it at each precision the memory check considers, against what this machine's
best device has free now; the precision `--dtype auto` picks is the one `videoqa ask` uses."""

from __future__ import annotations

from videoqa import memory, models

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def precisions(auto: str, device_type: str) -> dict[str, tuple[str, int]]:
    """Each precision as (quantize, compute dtype bytes): the compute dtypes, then the quantizations that run on the
    device, whose other weights and activations are in the dtype `--quantize` alone gives them (on a CPU bfloat16
    for int8 and int4, auto's for nf4)."""
    from videoqa.quantization import library
    from videoqa.errors import VideoQAError

    found = {name: ("none", size) for name, size in DTYPE_BYTES.items()}
    for quantize in ("int8", "int4", "nf4"):
        try:
            library(quantize, device_type)
        except VideoQAError:
            continue
        dtype = "bfloat16" if device_type == "cpu" and quantize != "nf4" else auto
        found[quantize] = (quantize, DTYPE_BYTES[dtype])
    return found


def disk_size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())  # the snapshot's links resolve to blobs


def estimates(preset, path, device, auto: str) -> dict[str, memory.Estimate]:
    """Per precision: from the checkpoint's headers and config when it is downloaded, else the preset's table."""
    from videoqa.session import Checkpoint

    found = Checkpoint(str(path) if path else preset.name, device=device.type, check_memory=False, cache=False)
    if path is not None:
        found.resolve()
    return {name: found.estimate(quantize=q, dtype_bytes=b) for name, (q, b) in precisions(auto, device.type).items()}


def rows(device_name: str = "auto", max_memory: str | None = None) -> tuple[list[dict], str]:
    """One row per preset, and the device (and free memory, or --max-memory below it) "fits" was judged against."""
    device = models.pick_device(device_name)
    auto = str(models.pick_dtype("auto", device)).removeprefix("torch.")
    have, against = memory.room(device, None if max_memory is None else memory.parse_size(max_memory))
    found = []
    for preset in models.presets().values():
        path = models.cached(preset.repo, preset.revision)
        needs = estimates(preset, path, device, auto)
        fits = {name: e.total <= have for name, e in needs.items()}
        found.append({
            "name": preset.name, "architecture": preset.family.name, "repo": preset.repo,
            "cached": path is not None, "disk_bytes": disk_size(path) if path else 0,
            "memory_bytes": {name: round(e.total) for name, e in needs.items()}, "fits": fits,
            "auto": auto, "default_fits": fits[auto],
        })
    return found, against
