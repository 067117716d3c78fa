"""The settings a question is answered with, in one table: names, ranges, defaults and help; and the choices a
model is loaded with.

The command-line options, chat's `/set` (parse, check, display), the Python API's keywords and a
preset's `[generation]` defaults all derive from SPECS, so a new setting is one entry here and one
field of `Settings` or `Sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from videoqa.errors import VideoQAError

SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Spec:
    """One setting: its type, range [low, high] (`open_low`: low itself excluded) and help."""

    name: str
    kind: type
    default: Any  # None: none (seed), or the preset's (frames)
    help: str
    flags: tuple[str, ...]
    low: float = 0
    high: float = math.inf
    open_low: bool = False
    unset: bool = False  # `none` (in /set) and None (in the API) unset it

    def accepted(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.high == math.inf:
            return f"{what} {'>' if self.open_low else '>='} {self.low:g}"
        high = "2^64-1" if self.high == SEED_MAX else f"{self.high:g}"
        return f"{what} in {'(' if self.open_low else '['}{self.low:g}, {high}]"

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None; NaN and infinities never are."""
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return f"{value!r} is not {self.accepted()}"
        above = value > self.low if self.open_low else value >= self.low
        if self.kind is float and not math.isfinite(value) or not (above and value <= self.high):
            return f"{value} is not {self.accepted()}"
        return None

    def parse(self, text: str) -> Any:
        """`/set` and environment text -> a checked value; `none` unsets the seed, fps and max_frames."""
        if self.unset and text.lower() == "none":
            return None
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        reason = f"{text!r} is not {self.accepted()}" if value is None else self.problem(value)
        if reason:
            raise VideoQAError(f"{self.name}: {reason}")
        return value


# How a model is loaded (the CLI's choices and the API's `load` keywords): a device, a compute dtype, quantization
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float16", "bfloat16", "float32")
QUANTIZE = ("none", "int8", "int4", "nf4")

SPECS = {
    spec.name: spec
    for spec in (
        Spec("frames", int, None, "Frames sampled uniformly \\[default: the model's: 8 for the LLaVA ones; Qwen and "
             "SmolVLM2 sample by time].", ("--frames", "-f"), low=1),
        Spec("fps", float, None, "Sample by time instead: this many frames a second (up to --max-frames, and what "
             "the context and memory hold) \\[default: Qwen 2, SmolVLM2 1].", ("--fps",), open_low=True, unset=True),
        Spec("max_frames", int, None, "The most frames --fps samples \\[default: the model's (Qwen 768, SmolVLM2 "
             "64), and what the context and memory hold].", ("--max-frames",), low=1, unset=True),
        Spec("max_new_tokens", int, 256, "Answer length limit in tokens; 0: no answer (the video is encoded, no "
             "token generated) \\[default: 256].", ("--max-new-tokens", "-n")),
        Spec("temperature", float, 0.0, "0 is greedy \\[default: 0].", ("--temperature", "-t")),
        Spec("top_k", int, 0, "Sample from the k likeliest tokens (0: all).", ("--top-k",)),
        Spec("top_p", float, 1.0, "Nucleus sampling mass, in (0, 1].", ("--top-p",), high=1, open_low=True),
        Spec("seed", int, None, "Same seed, same sampled answer (0 to 2^64-1).", ("--seed",), high=SEED_MAX,
             unset=True),
        Spec("logprobs", int, None, "Each answer token's log-probability and the N likeliest alternatives, in the "
             "JSON record (0: the token's alone).", ("--logprobs",), unset=True),
    )
}


@dataclass(frozen=True)
class Sampling:
    temperature: float = SPECS["temperature"].default  # 0 means greedy
    top_k: int = SPECS["top_k"].default  # 0 keeps every token
    top_p: float = SPECS["top_p"].default
    seed: int | None = SPECS["seed"].default


SAMPLING = {f.name for f in fields(Sampling)}
FRAMING = ("frames", "fps", "max_frames")  # how a video's frames are chosen: read with the media, not per turn


@dataclass(frozen=True)
class Settings:
    """What a question is answered with: frames sampled (`frames` uniformly, or by time when `fps` is set, at most
    `max_frames`), answer length, sampling, and what the record says of each token."""

    frames: int
    fps: float | None = None
    max_frames: int | None = None
    max_new_tokens: int = SPECS["max_new_tokens"].default
    sampling: Sampling = field(default_factory=Sampling)
    logprobs: int | None = None  # alternatives listed per answer token; None: no log-probabilities
    stop: tuple[str, ...] = ()  # the answer ends where its text first holds one of these (not in SPECS: a list)

    def get(self, name: str) -> Any:
        return getattr(self.sampling if name in SAMPLING else self, name)

    def changed(self, **values: Any) -> Settings:
        """A copy with some settings changed; unknown names and out-of-range values raise (seed None: unseeded;
        stop: texts, a list)."""
        if "stop" in values:
            values = {**values, "stop": stop_texts(values["stop"])}
        for name, value in values.items():
            if name == "stop":
                continue
            if name not in SPECS:
                raise VideoQAError(f"unknown setting {name!r}; settings: {', '.join(SPECS)}")
            reason = None if value is None and SPECS[name].unset else SPECS[name].problem(value)
            if reason:
                raise VideoQAError(f"{name}: {reason}")
        if values.get("frames") is not None:  # a frame count samples uniformly: not with a rate too
            if values.get("fps") is not None:
                raise VideoQAError("frames and fps: give one (a count spread evenly, or a rate by time)")
            values = {**values, "fps": None}
        sampling = replace(self.sampling, **{k: v for k, v in values.items() if k in SAMPLING})
        return replace(self, sampling=sampling, **{k: v for k, v in values.items() if k not in SAMPLING})

    def show(self) -> str:
        """`/set`'s display: the sampling settings first."""
        return "  ".join(f"{name} {self.get(name)}" for name in sorted(SPECS, key=lambda name: name not in SAMPLING))


def stop_texts(given: Any) -> tuple[str, ...]:
    """Stop strings as given (one text, or several): each non-empty."""
    texts = (given,) if isinstance(given, str) else tuple(given or ())
    if not all(isinstance(text, str) and text for text in texts):
        raise VideoQAError(f"stop {list(texts)!r}: give non-empty texts")
    return texts


def defaults(frames: int, generation: dict[str, Any]) -> Settings:
    """A preset's settings: its frame count and `[generation]` table over the built-in defaults."""
    return Settings(frames=frames).changed(**generation)
