"""`videoqa doctor`: one screen that tells why something will not work, each line a check that is ok, a warning
or a problem: the versions of Python and of the libraries a run uses, the devices, whether PyAV decodes a video it
has just written, the Hugging Face cache, which presets are cached and which fit this machine at which precision
(videoqa.catalogue's figures, as `videoqa models` shows them), and the feature cache's and history's sizes.

A probe that fails is a problem line that says why, never a traceback. A default run can work unless a check it
needs is a problem (`Check.needed`): torch and transformers import, PyAV decodes, at least one preset fits at some
precision (and torch can run on each CUDA device `--device auto` would pick).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from videoqa.memory import size
from videoqa.names import display

STATUSES = ("ok", "warning", "problem")
COLOURS = {"ok": "green", "warning": "yellow", "problem": "red"}
QUANTIZED = ("int8", "int4", "nf4")
PROBE_FRAMES, PROBE_SIDE, PROBE_SECONDS = 16, 64, 10.0
ENCODERS = ("mpeg4", "libx264", "h264", "libopenh264", "mjpeg")  # first that PyAV has, into an MP4
QUANT_HINT = "pip install 'videoqa[quant]'"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # one of STATUSES
    detail: str
    needed: bool = False  # a default run cannot work while this check is a problem

    def as_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail}


def run(device: str = "auto", max_memory: str | None = None, model: str = "video-llava-7b") -> list[Check]:
    """Every check, in the order shown. A bad --max-memory is a usage error (exit 2), raised before any probe;
    `model` is the preset a run without -m uses."""
    from videoqa.memory import parse_size

    if max_memory is not None:
        parse_size(max_memory)
    steps = [  # (name, probe, its arguments, whether a default run needs it)
        ("python", python_version, (), False),
        ("torch", package, ("torch", "torch", "torch", "pip install torch"), True),
        ("transformers", package, ("transformers", "transformers", "transformers", "pip install transformers"), True),
        ("PyAV", package, ("PyAV", "av", None, "pip install av"), False),
        ("bitsandbytes", package, ("bitsandbytes", "bitsandbytes", None,
                                   f"--quantize int8 on CUDA and nf4 need it: {QUANT_HINT}"), False),
        ("torchao", package, ("torchao", "torchao", None, f"--quantize int8 and int4 on the CPU need it: {QUANT_HINT}"),
         False),
        ("cuda", cuda, (), False),  # a device torch cannot run on is a needed problem: gpu() says so
        ("mps", mps, (), False),
        ("cpu bfloat16", cpu_bfloat16, (), False),
        ("ram", ram, (), False),
        ("video decoding", video_decoding, (), True),
        ("hf cache", hf_cache, (), False),
        ("offline", offline, (), False),
        ("fits", presets, (device, max_memory, model), True),
        ("feature cache", feature_cache, (), False),
        ("history", history, (), False),
    ]
    return [check for name, step, args, needed in steps for check in probe(name, step, *args, needed=needed)]


def probe(name: str, step: Callable[..., Check | list[Check]], *args, needed: bool = False) -> list[Check]:
    """`step(*args)`'s checks, or, when it raises, one problem line named `name` that says why."""
    try:
        found = step(*args)
    except Exception as e:  # a broken install surfaces as anything; the screen must still come out
        return [Check(name, "problem", reason(e), needed)]
    return found if isinstance(found, list) else [found]


def reason(error: Exception) -> str:
    """An exception as one line: videoqa's own as its message, any other with its type."""
    from videoqa.errors import VideoQAError

    cause = " ".join(str(error).split()) or "no message"
    return (cause if isinstance(error, VideoQAError) else f"{type(error).__name__}: {cause}")[:300]


def can_run(checks: list[Check]) -> bool:
    """Whether a default run can work: no problem among the checks it needs."""
    return not any(c.needed and c.status == "problem" for c in checks)


def report(checks: list[Check]) -> dict:
    """The --json object."""
    return {"checks": [c.as_json() for c in checks], "ok": can_run(checks)}


def text(checks: list[Check], colour: bool) -> str:
    """One line per check: its status, name and detail; the status coloured where `colour` (stdout is a
    terminal) and NO_COLOR is not set (rich reads it). Lines are never wrapped here: a terminal wraps them."""
    import io

    from rich.console import Console
    from rich.text import Text

    console = Console(file=io.StringIO(), force_terminal=colour, color_system="standard" if colour else None,
                      highlight=False, width=10_000)
    width = max(len(c.name) for c in checks)
    for c in checks:
        console.print(Text.assemble((f"{c.status:<7}", COLOURS[c.status]), f"  {c.name:<{width}}  {c.detail}"),
                      soft_wrap=True)
    return console.file.getvalue()


def python_version() -> Check:
    """Python, against the `Requires-Python` videoqa was installed with."""
    version, where = platform.python_version(), display(sys.executable)
    try:
        wanted = metadata.metadata("videoqa")["Requires-Python"]
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        wanted = None
    if wanted and not specifier(wanted).contains(version, prereleases=True):
        return Check("python", "problem", f"{version} ({where}), but videoqa needs Python {wanted}")
    return Check("python", "ok", f"{version} ({where})")


def specifier(text: str):
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(text)


def wanted_version(dist: str):
    """What videoqa's metadata asks of `dist` (its extras' too), or None: not asked, or videoqa not installed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        lines = metadata.requires("videoqa") or []
    except metadata.PackageNotFoundError:
        return None
    for line in lines:
        found = Requirement(line)
        if canonicalize_name(found.name) == canonicalize_name(dist) and str(found.specifier):
            return found.specifier
    return None


def package(name: str, dist: str, module: str | None, hint: str) -> Check:
    """`dist`'s installed version, against what videoqa asks of it; with a `module`, a package a run cannot do
    without, which must import too (a broken install fails there: a missing shared library, say). Missing: a
    problem for those, a warning for the optional ones (bitsandbytes and torchao print notes when imported, so
    they are not)."""
    missing = "problem" if module else "warning"
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return Check(name, missing, f"not installed: {hint}", module is not None)
    wanted = wanted_version(dist)
    if wanted is not None and not wanted.contains(version, prereleases=True):
        return Check(name, missing, f"{version}, but videoqa needs {dist}{wanted}: pip install -U '{dist}{wanted}'",
                     module is not None)
    if module is not None:
        try:
            __import__(module)
        except Exception as e:
            return Check(name, "problem", f"{version}, but it does not import: {reason(e)}", True)
    return Check(name, "ok", version, module is not None)


def cuda() -> list[Check]:
    """Each CUDA device (name, compute capability, free and total memory), or why there is none."""
    import torch

    if torch.cuda.is_available():
        return [gpu(index) for index in range(torch.cuda.device_count())]
    gpu_here = Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()
    if torch.version.cuda is None:
        if gpu_here:
            return [Check("cuda", "warning", f"this machine has an NVIDIA GPU, but torch {torch.__version__} is a "
                          "CPU-only build: install a CUDA build of torch (pytorch.org/get-started) to use it")]
        return [Check("cuda", "ok", f"none (torch {torch.__version__} is a CPU-only build): runs use the CPU")]
    status = "warning" if gpu_here else "ok"
    return [Check("cuda", status, f"no usable device (torch built for CUDA {torch.version.cuda}; a driver "
                  "missing or too old?): runs use the CPU")]


def gpu(index: int) -> Check:
    """One CUDA device; a problem when this torch has no kernels for its compute capability (`--device auto` picks
    it, and the run fails)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    detail = (f"{props.name}, compute capability {props.major}.{props.minor}, {size(free)} free of "
              f"{size(total)}")
    built = torch.cuda.get_arch_list()
    if not runs_on((props.major, props.minor), built):
        return Check(f"cuda:{index}", "problem", f"{detail}; torch {torch.__version__} has no kernels for it "
                     f"(built for {', '.join(built)})", True)
    return Check(f"cuda:{index}", "ok", detail)


def runs_on(capability: tuple[int, int], built: list[str]) -> bool:
    """Whether code built for `built` (torch's `sm_XY` and `compute_XY` targets) runs on a device of this compute
    capability: a binary of the same major version and no newer minor one, or PTX of no newer version (JIT).
    Unknown targets: assume it does."""
    targets = [(kind, int(arch[:-1]), int(arch[-1])) for kind, _, arch in (t.partition("_") for t in built)
               if arch[:-1].isdigit() and arch[-1].isdigit()]
    if not targets:
        return True
    return any((kind == "sm" and major == capability[0] and minor <= capability[1])
               or (kind == "compute" and (major, minor) <= capability) for kind, major, minor in targets)


def mps() -> Check:
    """Apple's GPU: what `--device auto` picks after CUDA."""
    import torch

    if torch.backends.mps.is_available():
        return Check("mps", "ok", f"available: {size(torch.mps.recommended_max_memory())} recommended working set")
    if platform.system() != "Darwin":
        return Check("mps", "ok", "not available (Apple silicon, macOS only)")
    built = "" if torch.backends.mps.is_built() else f" (torch {torch.__version__} is built without it)"
    return Check("mps", "warning", f"not available{built}: runs use the CPU")


def cpu_bfloat16() -> Check:
    """Whether the CPU computes bfloat16 natively: what `--dtype auto` computes in on the CPU, and half the memory
    of float32."""
    from videoqa import models

    if models.cpu_has_bf16():
        return Check("cpu bfloat16", "ok", "yes (AVX512-BF16, AMX or Arm BF16): --dtype auto computes in bfloat16 "
                     "on the CPU")
    return Check("cpu bfloat16", "ok", "no: --dtype auto computes in float32 on the CPU (twice the memory of "
                 "bfloat16; --quantize int8 or int4 computes in bfloat16 all the same)")


def ram() -> Check:
    """Memory available now, what a CPU run is checked against, of the machine's total."""
    from videoqa.memory import available_ram

    have = available_ram()
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return Check("ram", "ok", f"{size(have)} available")
    return Check("ram", "ok", f"{size(have)} available of {size(total)}")


def video_decoding() -> Check:
    """Whether PyAV writes and reads back a small video, in a thread so that a hung FFmpeg cannot hang the doctor
    (PROBE_SECONDS at most): every frame a run reads goes through PyAV."""
    found: dict = {}

    def work() -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="videoqa-doctor-") as directory:
                found["result"] = roundtrip(Path(directory) / "probe.mp4")
        except Exception as e:
            found["error"] = e

    started = time.perf_counter()
    worker = threading.Thread(target=work, name="videoqa-doctor-video", daemon=True)
    worker.start()
    worker.join(PROBE_SECONDS)
    if worker.is_alive():
        return Check("video decoding", "problem", f"PyAV did not write and read back a {PROBE_FRAMES}-frame video "
                     f"in {PROBE_SECONDS:.0f} s", True)
    if "error" in found:
        raise found["error"]
    codec, decoded, ffmpeg = found["result"]
    took = time.perf_counter() - started
    if decoded != PROBE_FRAMES:
        return Check("video decoding", "problem", f"PyAV wrote {PROBE_FRAMES} frames ({codec}) and read back "
                     f"{decoded}", True)
    return Check("video decoding", "ok", f"PyAV wrote and read back {PROBE_FRAMES} frames ({codec}, "
                 f"{PROBE_SIDE}x{PROBE_SIDE}) in {took:.2f} s; FFmpeg {ffmpeg}", True)


def encoder() -> str:
    """The first of ENCODERS this PyAV's FFmpeg can encode with."""
    import av

    for name in ENCODERS:
        if name in av.codecs_available:
            try:
                av.Codec(name, "w")
                return name
            except Exception:  # a decoder only
                continue
    raise RuntimeError(f"this PyAV's FFmpeg has none of the encoders {', '.join(ENCODERS)}")


def roundtrip(path: Path) -> tuple[str, int, str]:
    """Write PROBE_FRAMES frames of a gradient to `path`, decode them all back: (encoder, frames read, FFmpeg's
    version)."""
    import av
    import numpy as np

    codec = encoder()
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=8)
        stream.width = stream.height = PROBE_SIDE
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(PROBE_FRAMES):
            pixels = np.full((PROBE_SIDE, PROBE_SIDE, 3), i * (256 // PROBE_FRAMES), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder
    with av.open(str(path)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    return codec, decoded, getattr(av, "ffmpeg_version_info", "?")


def hf_cache() -> Check:
    """Where presets are downloaded to, and whether a download could write there."""
    from huggingface_hub import constants

    path = Path(constants.HF_HUB_CACHE)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    shown = display(path) + ("" if path.exists() else " (not created yet)")
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        return Check("hf cache", "warning", f"{shown}: not writable, so presets cannot be downloaded (set HF_HOME "
                     "or HF_HUB_CACHE to a folder that is)")
    return Check("hf cache", "ok", shown)


def offline() -> Check:
    """HF_HUB_OFFLINE: whether presets not cached can be downloaded (the hub itself is not contacted here)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return Check("offline", "ok", "yes (HF_HUB_OFFLINE is set): only cached presets can run")
    return Check("offline", "ok", "no: a preset not cached is downloaded on its first run")


def presets(device: str, max_memory: str | None, model: str) -> list[Check]:
    """The catalogue's rows (`videoqa models`), read once: which presets are cached, which fit at which precision,
    which fit at none, and whether the default preset fits."""
    from videoqa.catalogue import rows
    from videoqa.models import pick_device

    found, against = rows(device, max_memory)
    usable = usable_precisions(list(found[0]["memory_bytes"]) if found else [], pick_device(device).type)
    best = {row["name"]: best_fit(row, usable) for row in found}
    return [cached_presets(found), fitting(found, best, against), too_big(found, best, usable, against),
            *default_model(found, best, model, against)]


def usable_precisions(precisions: list[str], device_type: str) -> list[str]:
    """The catalogue's precisions whose library is installed (a quantization without it cannot run)."""
    from videoqa.quantization import available, library

    return [p for p in precisions if p not in QUANTIZED or available(library(p, device_type))]


def best_fit(row: dict, usable: list[str]) -> str | None:
    """The precision a preset runs in here: `--dtype auto`'s if it fits, else the quantization that fits with the
    most bytes (the least lost), else None."""
    quantized = sorted((p for p in usable if p in QUANTIZED), key=lambda p: -row["memory_bytes"][p])
    return next((p for p in [row["auto"], *quantized] if row["fits"][p]), None)


def cached_presets(found: list[dict]) -> Check:
    """The presets in the Hugging Face cache, with their size on disk."""
    from huggingface_hub import constants

    cached = [f"{row['name']} {size(row['disk_bytes'])}" for row in found if row["cached"]]
    if cached:
        return Check("cached presets", "ok", f"{len(cached)} of {len(found)}: {', '.join(cached)}")
    if constants.HF_HUB_OFFLINE:
        return Check("cached presets", "warning", "none, and HF_HUB_OFFLINE is set: no preset can run until one is "
                     "downloaded (unset it, or `hf download <hub id>`)")
    return Check("cached presets", "ok", "none yet: a preset's first run downloads it")


def fitting(found: list[dict], best: dict[str, str | None], against: str) -> Check:
    """The presets that fit, grouped by the precision each would run in; a problem when none does."""
    groups: dict[str, list[str]] = {}
    for row in found:
        if best[row["name"]] is not None:
            groups.setdefault(best[row["name"]], []).append(row["name"])
    if not groups:
        return Check("fits", "problem", f"no preset fits at any precision ({against})", True)
    auto = found[0]["auto"]
    shown = "; ".join(f"{f'{p} (auto)' if p == auto else f'--quantize {p}'}: {', '.join(names)}"
                      for p, names in groups.items())
    count = sum(map(len, groups.values()))
    return Check("fits", "ok", f"{count} of {len(found)} presets ({against}): {shown}", True)


def too_big(found: list[dict], best: dict[str, str | None], usable: list[str], against: str) -> Check:
    """The presets that fit at no precision, with the least each needs."""
    big = [row for row in found if best[row["name"]] is None]
    if not big:
        return Check("does not fit", "ok", "none: every preset fits at some precision")
    least = [f"{row['name']} ({size(min(row['memory_bytes'][p] for p in usable))})" for row in big]
    return Check("does not fit", "warning", f"{len(big)} of {len(found)} presets fit at no precision ({against}); "
                 f"the least each needs: {', '.join(least)}")


def default_model(found: list[dict], best: dict[str, str | None], model: str, against: str) -> list[Check]:
    """Whether a run without -m (`model`) fits as it is, and if not what would."""
    row = next((r for r in found if r["name"] == model), None)
    if row is None:
        return []
    auto, needs = row["auto"], size(row["memory_bytes"][row["auto"]])
    if row["default_fits"]:
        return [Check("default model", "ok", f"{model} (a run without -m) fits at {auto}: {needs}")]
    way_out = f"add --quantize {best[model]}" if best[model] else "use a smaller preset (-m)"
    return [Check("default model", "warning", f"{model} (a run without -m) needs {needs} at {auto} ({against}): "
                  f"{way_out}")]


def feature_cache() -> Check:
    """The video feature cache's folder, entries and size against its bound (`videoqa cache info`)."""
    from videoqa.cache import cache_dir, info
    from videoqa.errors import VideoQAError

    directory = cache_dir()
    try:
        facts = info(directory)
    except VideoQAError as e:  # a bad VIDEOQA_CACHE_MAX_MB: runs warn and use the default bound
        return Check("feature cache", "warning", f"{display(directory)}: {e}")
    return Check("feature cache", "ok", f"{display(directory)}: {facts['entries']} entries, "
                 f"{facts['bytes'] / 2**20:.1f} MiB of {facts['max_bytes'] // 2**20} MiB")


def history() -> Check:
    """The history database's size, where it is kept."""
    from videoqa.history import path as history_path

    path = history_path()
    if not path.is_file():
        return Check("history", "ok", f"no history yet ({display(path)})")
    return Check("history", "ok", f"{display(path)}: {size(path.stat().st_size)}")
