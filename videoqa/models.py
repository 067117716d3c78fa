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


@dataclass(frozen=True)
class Architecture:
    """What videoqa needs to know of a model_type that its config.json does not say."""

    model_class: str  # the transformers class that loads it
    preset: str  # whose defaults (template, frames, generation) a directory or hub id of this architecture gets
    video: bool = True  # False: it answers about still images only


ARCHITECTURES = {  # by config.json's model_type
    "video_llava": Architecture("VideoLlavaForConditionalGeneration", "video-llava-7b"),
    "llava_next_video": Architecture("LlavaNextVideoForConditionalGeneration", "llava-next-video-7b"),
    "llava_next": Architecture("LlavaNextForConditionalGeneration", "llava-v1.6-vicuna-7b", video=False),
}
SUPPORTED = tuple(ARCHITECTURES)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What a run needs from a repository: configs, tokenizer files and safetensors weights, never pickles.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


@dataclass
class Preset:
    name: str
    repo: str
    revision: str
    architecture: str
    frames: int
    template: str  # the first turn, {media} being the placeholder token
    followup: str  # later turns, appended after the previous answer and its EOS
    generation: dict[str, Any] = field(default_factory=dict)


def presets_dir() -> Path:
    here = Path(__file__).parent
    # Installed wheels carry the presets inside the package; a source checkout has them at the top.
    return next(p for p in (here / "presets", here.parent / "presets") if p.is_dir())


def presets() -> dict[str, Preset]:
    found = {}
    for file in sorted(presets_dir().glob("*.toml")):
        data = tomllib.loads(file.read_text())
        found[file.stem] = Preset(name=file.stem, **data)
    return found


def preset_for(architecture: str) -> Preset:
    """The defaults (frames, template, generation) of a directory or hub id come from its architecture's preset."""
    return presets()[ARCHITECTURES[architecture].preset]


def check_video(architecture: str, name: str) -> None:
    """Refuse a video for an image-only model, before anything slow is done."""
    if not ARCHITECTURES[architecture].video:
        raise VideoQAError(f"{name} ({architecture}) answers about still images only, not videos: give it an image")


def download(repo: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:
        raise VideoQAError(
            f"{repo} is not in the Hugging Face cache and could not be downloaded ({type(e).__name__}); "
            f"fetch it with `hf download {repo} --revision {revision}` (with HF_HUB_OFFLINE unset)",
            Exit.MODEL,
        ) from None


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


def check_dir(path: Path) -> str:
    """Validate a checkpoint directory and return its architecture (config.json's model_type)."""
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
        architecture = json.loads(config.read_text()).get("model_type", "?")
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON (or not UTF-8), not an object
        raise VideoQAError(f"{config}: not a valid config.json ({type(e).__name__})", Exit.MODEL) from None
    if architecture not in SUPPORTED:
        raise VideoQAError(
            f"{path}: unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED)}", Exit.MODEL
        )
    return architecture


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
    architecture = check_dir(path)
    return path, preset or preset_for(architecture)


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


def pick_dtype(name: str, device):
    import torch

    if name == "auto":  # half precision where the hardware is built for it
        return torch.float32 if device.type == "cpu" else torch.float16
    return getattr(torch, name)


@dataclass
class Model:
    name: str
    preset: Preset
    net: Any  # the ARCHITECTURES class of its model_type
    tokenizer: Any

    @property
    def context(self) -> int:
        return context(self.net.config)


def context(config) -> int:
    """Positions the text model handles: linear RoPE scaling stretches them (LLaVA-NeXT-Video-7B: 4096 x 2)."""
    text = config.text_config
    rope = getattr(text, "rope_parameters", None) or {}
    stretch = rope.get("factor", 1.0) if rope.get("rope_type") == "linear" else 1.0
    return int(text.max_position_embeddings * stretch)


def config_of(path: Path):
    """The checkpoint's config, checked as far as videoqa reads it before loading: a malformed field is a model
    error here, not a crash later."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        context(config)
        if ARCHITECTURES[config.model_type].video:
            frame_positions(config)
    except Exception as e:
        raise VideoQAError(f"{path}/config.json: {type(e).__name__}: {e}".splitlines()[0], Exit.MODEL) from None
    return config


def frame_positions(config) -> int:
    """Placeholder positions one video frame takes, known from the config before anything is decoded."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    if config.model_type == "video_llava":
        return side * side + 1  # all patches and CLS
    return (side // config.spatial_pool_stride) ** 2  # patches, pooled


def check_frames(config, frames: int) -> None:
    """Refuse a frame count whose video alone overflows the context, before decoding a single frame."""
    needed = frames * frame_positions(config)
    if needed >= context(config):
        raise VideoQAError(
            f"--frames {frames}: the video alone needs {needed} positions and the model's context holds "
            f"{context(config)}; use at most {(context(config) - 1) // frame_positions(config)} frames"
        )


def load(name: str, path: Path, preset: Preset, device, dtype) -> Model:
    """Load weights straight to the target device in the target dtype, with the class of the preset's architecture."""
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()  # load reports and bars are noise for a CLI user
    logging.disable_progress_bar()
    model_class = getattr(transformers, ARCHITECTURES[preset.architecture].model_class)
    try:
        net = model_class.from_pretrained(  # device_map streams each tensor from the file to the device (accelerate)
            path, dtype=dtype, device_map=str(device), use_safetensors=True, trust_remote_code=False
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise VideoQAError(f"{path}: cannot load the model ({type(e).__name__}: {e})".splitlines()[0], Exit.MODEL)
    return Model(name=name, preset=preset, net=net.eval(), tokenizer=tokenizer)
