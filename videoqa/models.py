"""Presets, checkpoint resolution and loading: which weights, on which device, in which dtype.

A `--model` is a preset name (a TOML file in presets/), a local directory in
Hugging Face format, or a hub id. Only safetensors are read; nothing is
unpickled and no remote code runs.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videoqa.errors import Exit, VideoQAError
from videoqa import families
from videoqa.families import Family
from videoqa.memory import is_oom


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What a run needs from a repository: configs, tokenizer files and safetensors weights, never pickles.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


@dataclass(frozen=True)
class Preset:
    """A checkpoint with a name: where it is on the hub, its family, and what it overrides of the family's defaults
    (a local directory or hub id gets its family's defaults as they are)."""

    name: str
    repo: str | None
    revision: str
    family: Family
    frames: int
    template: str
    followup: str
    followup_media: str
    generation: dict[str, Any] = field(default_factory=dict)
    describe: str = families.DESCRIBE  # a timeline's default question
    memory: dict[str, int] = field(default_factory=dict)  # parameters and dimensions, for estimates before download


def of_family(family: Family, name: str = "", repo: str | None = None, revision: str = "main", **overrides) -> Preset:
    defaults = dict(frames=family.frames, template=family.template, followup=family.followup,
                    followup_media=family.followup_media,
                    generation=dict(family.generation), describe=family.describe)
    return Preset(name=name, repo=repo, revision=revision, family=family, **{**defaults, **overrides})


def presets_dir() -> Path:
    here = Path(__file__).parent
    # Installed wheels carry the presets inside the package; a source checkout has them at the top.
    return next(p for p in (here / "presets", here.parent / "presets") if p.is_dir())


def presets() -> dict[str, Preset]:
    found = {}
    for file in sorted(presets_dir().glob("*.toml")):
        data = tomllib.loads(file.read_text())
        found[file.stem] = of_family(families.family(data.pop("architecture")), name=file.stem, **data)
    return found


def cached(repo: str, revision: str) -> Path | None:
    """The repository's snapshot in the local Hugging Face cache, or None; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        return None


def will_download(preset: Preset) -> bool:
    """Whether resolving the preset downloads it: not in the cache, and the hub can be reached (not offline)."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and cached(preset.repo, preset.revision) is None


def download(repo: str, revision: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    fetch = f"`hf download {repo} --revision {revision}`"
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:
        if constants.HF_HUB_OFFLINE:
            message = (f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: unset it to download "
                       f"the model, or fetch it with {fetch}")
        elif unreachable(e):
            message = f"cannot reach the Hugging Face hub: {unreachable(e)}; {repo} is not in the cache (fetch it " \
                      f"with {fetch} once the hub can be reached)"
        else:
            cause = (str(e).strip().splitlines() or [""])[0]
            message = f"{repo} could not be downloaded ({type(e).__name__}: {cause}); fetch it with {fetch}"
        raise VideoQAError(message, Exit.MODEL) from None


def unreachable(error: BaseException) -> str | None:
    """The network failure behind a download error (no name resolution, refused, timed out), as "Kind: what", or
    None when the hub answered."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in (
                "ConnectError", "ConnectTimeout", "gaierror", "ProxyError"):
            found = error  # the innermost one names the cause best
        error = error.__cause__ or error.__context__
    return None if found is None else f"{type(found).__name__}: {found}"


def check_safetensors(file: Path) -> None:
    """A truncated download fails here, before torch sees it: header and data must fill the file exactly."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len)) if 0 < header_len <= size - 8 else None
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    except Exception:
        header, end = None, -1
    if header is None or 8 + header_len + end != size:
        raise VideoQAError(f"{file}: weights are truncated or corrupt; download the model again", Exit.MODEL)


def check_dir(path: Path) -> Family:
    """Validate a checkpoint directory and return its family (by config.json's model_type)."""
    if path.is_file():
        raise VideoQAError(f"{path} is a file, not a model directory (a Hugging Face checkpoint folder)", Exit.MODEL)
    if not path.is_dir():
        raise VideoQAError(f"model directory {path} does not exist", Exit.MODEL)
    config = path / "config.json"
    if not config.is_file():
        raise VideoQAError(f"model directory {path} holds no config.json (not a Hugging Face checkpoint)", Exit.MODEL)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise VideoQAError(f"model directory {path} holds no .safetensors weights", Exit.MODEL)
    for file in weights:
        check_safetensors(file)
    try:
        model_type = json.loads(config.read_text()).get("model_type", "?")
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON (or not UTF-8), not an object
        raise VideoQAError(f"{config}: not a valid config.json ({type(e).__name__})", Exit.MODEL) from None
    return families.family(str(model_type), where=f"{path}: ")


def resolve(spec: str) -> tuple[Path, Preset]:
    """Turn a --model value into a checkpoint directory and the preset that gives its defaults."""
    known = presets()
    if spec in known:
        preset = known[spec]
        path = download(preset.repo, preset.revision)
    elif Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or not HUB_ID.match(spec):
        path = Path(spec).expanduser()
        if not path.exists() and not spec.startswith((".", "/", "~")):
            raise VideoQAError(
                f"unknown model {spec!r}: not a preset ({', '.join(known)}), directory or hub id", Exit.MODEL
            )
        preset = None
    else:
        path = download(spec, "main")
        preset = None
    found = check_dir(path)
    if preset is not None and preset.family is not found:
        raise VideoQAError(f"{spec}: its config.json says {found.name}, its preset {preset.family.name}", Exit.MODEL)
    return path, preset or of_family(found, name=spec)


def pick_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available[name]:
        raise VideoQAError(f"--device {name}: no {name.upper()} device is available on this machine", Exit.DEVICE)
    return torch.device(name)


def pick_dtype(name: str, device, quantize: str = "none"):
    """`auto`: float16 on CUDA and MPS; on a CPU, bfloat16 where it computes it natively (faster than float32 and
    half the memory), float32 elsewhere, and bfloat16 with --quantize int8 or int4 (torch's kernels for them are
    fast with bfloat16 activations only: benchmarks/README.md)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type != "cpu":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() or quantize in ("int8", "int4") else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: AVX512-BF16 or AMX on x86, the BF16 extension on ARM."""
    import platform
    import subprocess

    if platform.system() == "Darwin":
        probe = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return probe.stdout.strip() == "1"
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def context(config) -> int:
    """Positions the text model handles: linear RoPE scaling stretches them (LLaVA-NeXT-Video-7B: 4096 x 2)."""
    text = config.text_config
    rope = getattr(text, "rope_parameters", None) or {}
    stretch = rope.get("factor", 1.0) if rope.get("rope_type") == "linear" else 1.0
    return int(text.max_position_embeddings * stretch)


def check_feature_layers(config) -> None:
    """The vision tower's layers the features are read from must exist (-1 is the last; 0 the embeddings); the
    families that read the tower's own output name none."""
    if not hasattr(config, "vision_feature_layer"):
        return
    count = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer
    for layer in layers if isinstance(layers, (list, tuple)) else [layers]:
        if count < 1 or not -count - 1 <= layer <= count:
            raise ValueError(f"vision_feature_layer {layer} is not one of the vision tower's {count} layers")


def preprocessing(path: Path) -> dict[str, dict]:
    """The checkpoint's image and video preprocessor settings ({} for a file it lacks): the Qwen and SmolVLM
    families size their frames by them. Without a video file the video settings are the image file's, as
    transformers' video processors read them (Qwen2.5-VL's hub checkpoints have none)."""
    found = {}
    for kind, name in (("image", "preprocessor_config.json"), ("video", "video_preprocessor_config.json")):
        file = path / name
        found[kind] = json.loads(file.read_text()) if file.is_file() else None
    return {"image": found["image"] or {}, "video": found["video"] or found["image"] or {}}


def model_class(found: Family):
    import transformers

    return getattr(transformers, found.model_class)


def config_class(found: Family):
    """The family's config class, imported without its model (seconds sooner: the memory check and the
    checks of the config come before any model code is loaded)."""
    import transformers

    name = found.model_class.replace("ForConditionalGeneration", "Config")
    return getattr(transformers, name, None) or model_class(found).config_class


def physical_cores(cpuinfo: str, allowed: set[int]) -> int:
    """Physical cores among the `allowed` logical CPUs, from /proc/cpuinfo's text: SMT siblings share a (physical
    id, core id); 0 when the text names no cores (some ARM kernels)."""
    cores, processor, package = set(), None, "0"
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processor = int(value)
        elif key == "physical id":
            package = value
        elif key == "core id" and processor in allowed:
            cores.add((package, value))
    return len(cores)


def quota_cpus(cpu_max: str) -> int | None:
    """The CPUs a cgroup v2 quota (`cpu.max`: "QUOTA PERIOD", or "max PERIOD") allows, rounded up; None: no quota."""
    quota, _, period = cpu_max.strip().partition(" ")
    if quota == "max" or not period:
        return None
    return max(1, -(-int(quota) // int(period)))


def cpu_threads() -> int:
    """Threads for torch on this machine: one per physical core this process may run on, within its cgroup's quota.
    torch's own default counts every physical core of the machine (cpuinfo's count), whatever the process's
    affinity mask or a container's quota allow: oversubscribed threads wait on each other at every operation."""
    import os

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    found = [len(allowed)]
    for file, parse in (("/proc/cpuinfo", lambda text: physical_cores(text, allowed) or None),
                        ("/sys/fs/cgroup/cpu.max", quota_cpus)):
        try:
            with open(file) as f:
                found.append(parse(f.read()))
        except (OSError, ValueError):
            pass
    return max(1, min(n for n in found if n))


def use_cpu_threads() -> None:
    """Set torch's threads to `cpu_threads()`, unless OMP_NUM_THREADS or MKL_NUM_THREADS says otherwise."""
    import os

    import torch

    if not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
        torch.set_num_threads(cpu_threads())


def quiet_transformers() -> None:
    """transformers' load reports, warnings and bars are noise for a CLI user; its errors still become ours.
    (bitsandbytes, on a CPU without its optional `kernels` package, warns once that it uses its own; torchao,
    which transformers imports whenever it is installed, reports each optional kernel library it cannot load, CUDA
    ones on a CPU machine, and torch warns about two of its enums.)"""
    import logging as python_logging
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    for name, level in (("bitsandbytes", python_logging.ERROR), ("torchao", python_logging.ERROR),
                        ("torch.utils._pytree", python_logging.ERROR)):
        python_logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")


def config_of(path: Path, found: Family):
    """The checkpoint's config, read with its family's class and checked as far as videoqa reads it before loading:
    a malformed field is a model error here, not a crash later."""
    quiet_transformers()
    try:
        config = config_class(found).from_pretrained(path)
        # The class's own model_type: transformers picks the checkpoint's key renames by it, and a registered
        # family may name another (a renamed copy of Video-LLaVA's entry is still read as Video-LLaVA)
        config.model_type = type(config).model_type
        config.preprocessing = preprocessing(path)
        if context(config) < 1:
            raise ValueError(f"max_position_embeddings is {config.text_config.max_position_embeddings}")
        check_feature_layers(config)
        if found.video:
            found.video.positions(config, 1)
    except Exception as e:
        raise VideoQAError(f"{path}/config.json: {type(e).__name__}: {e}".splitlines()[0], Exit.MODEL) from None
    return config


def load(path: Path, found: Family, config, device, dtype, quantize: str = "none"):
    """(net, tokenizer): weights straight to the target device in the target dtype (the language model's linear
    layers quantized, if asked), with the family's class. A weight the checkpoint lacks is an error: transformers
    would fill it with random numbers."""
    import transformers

    from videoqa import quantization

    quiet_transformers()
    if device.type == "cpu":
        use_cpu_threads()
    bits = quantization.config(found, quantize, device, dtype, config.text_config)
    try:
        net, info = model_class(found).from_pretrained(  # device_map streams each tensor from the file to the device
            path, config=config, dtype=dtype, device_map=str(device), use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, quantization_config=bits,
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        if is_oom(e):
            raise
        raise VideoQAError(f"{path}: cannot load the model ({type(e).__name__}: {e})".splitlines()[0], Exit.MODEL)
    missing = sorted(info["missing_keys"])
    if missing:
        raise VideoQAError(f"{path}: the checkpoint lacks {len(missing)} weights of {found.model_class} "
                           f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})", Exit.MODEL)
    if quantization.library(quantize, device.type) == "torchao":
        quantization.finish(net, quantize, config.text_config)
    return net.eval(), tokenizer
