"""The Python API, and the one way the commands run the pipeline: check, read, load, answer.

    import videoqa
    model = videoqa.load("video-llava-7b")
    answer = model.ask("clip.mp4", "Why is this video funny?", max_new_tokens=64)

Everything is checked here, once: the file, its kind against the model's family, the frame count and each
prompt against the context. `Checkpoint` resolves and checks a model without loading it, so the commands read a
video (and refuse a bad one) before the slow load. Notices (a feature cache that could not be written) go to the
"videoqa" logger.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videoqa import memory, models, output
from videoqa.engine import Engine
from videoqa.memory import ADVICE
from videoqa import windows as timing
from videoqa.errors import VideoQAError
from videoqa.frames import ByTime, Frames, Rule, Sampler, check_file, frame_size, is_image, read_image
from videoqa.settings import DEVICES, DTYPES, FRAMING, QUANTIZE, Settings, defaults
from videoqa.windows import Window

Time = str | float | None  # seconds, or "[HH:]MM:SS[.mmm]"; None: the start or end of the video

log = logging.getLogger("videoqa")


@dataclass
class Media:
    """A video's sampled frames or a still image, read and checked; with its features when the cache had them."""

    path: Path
    frames: Frames | None = None
    image: Any = None  # a PIL image
    features: Any = None  # a features.Visual from the feature cache
    seconds: float = 0.0  # reading it (or finding it in the cache)


MediaArg = str | Path | Media  # a file to read, or one read already (`Model.media`)


@dataclass
class Answer:
    video: Path
    question: str
    prompt: str  # this turn's text given to the model, placeholder counted once
    text: str
    tokens: list[int]  # as generated, EOS included if it ended the answer
    frames: list[dict]  # {"index", "time"} of each sampled frame; empty for an image
    model: str
    runtime: dict[str, str]  # device, dtype and quantization it was computed with
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. that only part of the video decodes
    choices: list[dict] | None = None  # a multiple-choice question's options, scored: {text, logprob, ...}
    logprobs: list[dict] | None = None  # per token {token, text, logprob, top}, when asked for
    hidden_states: Any = None  # (tokens, layers, D) float32 tensor, when asked for
    attentions: list | None = None  # per token a (layers, heads, positions before it) float32 tensor, when asked
    media: list[Path] = field(default_factory=list)  # every file of the conversation, in the order given

    def record(self) -> dict:
        """The `--json` schema (README: Scripting)."""
        found = output.record(video=self.video, question=self.question, prompt=self.prompt, answer=self.text,
                              tokens=self.tokens, frames=self.frames, model=self.model, runtime=self.runtime,
                              timings=self.timings, warnings=self.warnings)
        several = [output.display(path) for path in self.media] if len(self.media) > 1 else None
        extra = {"media": several, "choices": self.choices, "logprobs": self.logprobs}
        return {**found, **{k: v for k, v in extra.items() if v is not None}}


class Checkpoint:
    """A model to be loaded: resolved and checked on first need (its preset, family, config, device, dtype and
    feature cache), so that a bad file is refused before the model is looked for, and both before the load."""

    def __init__(self, model: str | Path = "video-llava-7b", *, device: str = "auto", dtype: str = "auto",
                 cache: bool = True, quantize: str = "none", max_memory: str | float | None = None,
                 check_memory: bool = True, workload: dict[str, int | None] | None = None):
        for name, value, allowed in (("quantize", quantize, QUANTIZE), ("device", device, DEVICES),
                                     ("dtype", dtype, DTYPES)):
            if value not in allowed:
                raise VideoQAError(f"{name} {value!r}: one of {', '.join(allowed)}")
        self.name, self.options, self.resolved = str(model), (device, dtype, cache), False
        self.quantize, self.check_memory, self.workload = quantize, check_memory, workload or {}
        self.max_memory = memory.parse_size(max_memory) if isinstance(max_memory, str) else max_memory
        self.preset = models.presets().get(self.name)  # a directory or hub id: its family's defaults, once resolved
        self.path = self.config = None  # known once resolved (a preset's table stands in until it is downloaded)
        self.loaded = False  # then the memory in use holds the weights

    def spec(self, **changed: Any) -> dict[str, Any]:
        """The arguments that make this Checkpoint again (on another machine: a cluster's worker), some `changed`."""
        device, dtype, cache = self.options
        return {"model": self.name, "device": device, "dtype": dtype, "cache": cache, "quantize": self.quantize,
                "max_memory": self.max_memory, "check_memory": self.check_memory, "workload": self.workload,
                **changed}

    @functools.cached_property
    def device(self):
        return models.pick_device(self.options[0])

    @functools.cached_property
    def dtype(self):
        return models.pick_dtype(self.options[1], self.device, self.quantize)

    def resolve(self) -> Checkpoint:
        """Pick the device and dtype, check the run described by `workload` (frames, max_new_tokens, batch_size,
        medium): its medium and frames against the family and context, then its memory (from a preset's table
        before downloading it, then from the checkpoint), find the model (downloading it if needed) and check it.
        Once."""
        from videoqa.cache import open_cache

        if self.resolved:
            return self
        self.dtype  # noqa: B018 (an unavailable device is refused first, before the model is looked for)
        if self.preset:
            self.check_medium()  # before a download of many gigabytes, and before the memory check
            if self.check_memory and models.will_download(self.preset):
                self.fit()
        self.path, self.preset = models.resolve(self.name)
        self.family = self.preset.family
        self.config = models.config_of(self.path, self.family)
        self.check_medium()
        if self.check_memory:
            self.fit()
        self.cache = open_cache(self.path, self.dtype) if self.options[2] else None
        self.resolved = True
        return self

    @property
    def context(self) -> int:
        return models.context(self.resolve().config)

    def settings(self, **given: Any) -> Settings:
        """The preset's settings with `given` ones (not None) over them; out-of-range values raise."""
        chosen = {k: v for k, v in given.items() if v is not None}
        preset = self.preset if self.preset is not None else self.resolve().preset
        return defaults(preset.frames, preset.generation).changed(**chosen)

    def sampler(self, settings: Settings, size: tuple[int, int] | None = None) -> Rule:
        """How the frames of a video of frame `size` (height, width) are chosen: `frames` spread evenly, or (`fps`
        set) by time, at least the family's fewest, capped by `max_frames`, by what the model's context holds and,
        with the memory check on, by what the memory holds (the cap that cuts the rate is named in the frames'
        warnings). The size matters where a frame's tokens follow it (Qwen's dynamic resolution)."""
        if settings.fps is None:
            return settings.frames
        self.resolve()
        video = self.preset.family.video
        caps = []
        if settings.max_frames is not None:  # given, or the model's own default (Qwen's 768)
            own = settings.max_frames == self.preset.generation.get("max_frames")
            caps.append((settings.max_frames, "the model's max_frames" if own else "--max-frames"))
        room = self.context - memory.TEXT  # the question's text and the template take some of the context
        caps.append((video.max_frames(self.config, room, size), "the model's context"))
        if self.check_memory:
            caps.append((self.most_frames(self.memory_budget(), caps[-1][0] + 1, size), "the memory free"))
        most, why = min(caps, key=lambda cap: cap[0])
        return ByTime(settings.fps, max(most, 1), why, least=min(video.least, max(most, 1)))

    def memory_budget(self) -> float:
        """Bytes the whole run may take: what the device has free (plus, once loaded, the weights it holds
        already, which the estimate counts), or --max-memory below that."""
        have, _ = memory.free(self.device)
        if self.loaded:
            have += self.estimate(**self.workload).weights * memory.MARGIN
        return have if self.max_memory is None else min(have, self.max_memory)

    @staticmethod
    def least(settings: Settings) -> int:
        """The fewest frames a video question with these settings takes: what the checks before reading count."""
        return settings.frames if settings.fps is None else 1

    def check_medium(self) -> None:
        """The workload's media, if known: its videos' frames against the family and the context."""
        media = [self.workload.get("medium"), *(medium for medium, _ in self.workload.get("extra", ()))]
        if "video" in media:
            self.check_videos(self.settings(frames=self.workload.get("frames")).frames)

    def video_sizes(self) -> list[tuple[int, int] | None]:
        """The frame size of each video the workload has (None: not known), the first file's first: one video
        unless the first file is an image, then those given with it."""
        first = [] if self.workload.get("medium") == "image" else [self.workload.get("size")]
        return first + [size for medium, size in self.workload.get("extra", ()) if medium == "video"]

    def check_videos(self, frames: int) -> None:
        """Refuse videos for an image-only family, and frames whose videos alone fill the context (every video of
        the workload counted): for a preset not downloaded yet, from its table (nothing is downloaded for a run
        that cannot work)."""
        family = self.preset.family if self.preset else self.resolve().family
        if not family.video:
            raise VideoQAError(f"{self.name} ({family.name}) answers about still images only, not videos: "
                               "`videoqa ask` takes images; caption, timeline and find need a video model")
        sizes = self.video_sizes() or [None]
        if self.config is None:  # a preset not resolved yet: from its table, or once its config is read
            if "context" not in self.preset.memory:
                return
            table = self.preset.memory
            context, (each, most) = table["context"], memory.table_frames(table, frames)
            needed = each * len(sizes)
        else:
            context = models.context(self.config)
            needed = sum(family.video.positions(self.config, frames, size) for size in sizes)
            most = family.video.max_frames(self.config, context, sizes[0])
        if needed >= context:
            if len(sizes) > 1:
                raise VideoQAError(f"--frames {frames}: the {len(sizes)} videos alone need {needed} positions and the "
                                   f"model's context holds {context}; use fewer frames or fewer videos")
            raise VideoQAError(f"--frames {frames}: the video alone needs {needed} positions and the model's context "
                               f"holds {context}; use at most {most} frames")

    def expect(self, path: str | Path, frames: int | None = None, *, fps: float | None = None, start: Time = None,
               end: Time = None, more: bool = False) -> bool:
        """Check a video or image before the model is looked for (and downloaded): the file, its window (videos
        only), and a video's frames (`fps`: by time, so at least one) against the family and context; the run's
        memory is then checked for this medium (`more`: one more file of the same question, counted with the
        first). Whether it is an image."""
        path, window = Path(path), timing.window(start, end)
        check_file(path)
        image = is_image(path)
        if image and not window.whole:
            raise VideoQAError(f"{path}: an image has no time window; start and end are for videos")
        if more:
            extra = ("image", None) if image else ("video", frame_size(path))
            self.workload = {**self.workload, "extra": [*self.workload.get("extra", ()), extra]}
            if not image and (self.preset or self.resolved):
                self.check_videos(self.least(self.settings(frames=frames, fps=fps)))
            return image
        if not self.resolved:
            self.workload = {**self.workload, "medium": "image" if image else "video"}
            if not image and (frames is not None or fps is not None):
                self.workload["frames"] = 1 if fps is not None else frames
        if not image:  # where a frame's tokens follow its size, the checks count this video's
            self.workload = {**self.workload, "size": frame_size(path)}
        if not image and (self.preset or self.resolved):  # a directory's family is known once resolved, which
            self.check_videos(self.least(self.settings(frames=frames, fps=fps)))  # checks the workload's then
        return image

    def media(self, path: str | Path, frames: int | None = None, *, fps: float | None = None,
              max_frames: int | None = None, start: Time = None, end: Time = None) -> Media:
        """A video (`frames` sampled evenly, the preset's count by default, or `fps` a second up to `max_frames`;
        from its window [start, end) if given) or an image, read and checked (first as `expect` checks it). What a
        damaged video's frames warn of, or a cap that cut the rate, goes to the logger too."""
        from videoqa.cache import read_video

        image = self.expect(path, frames, fps=fps, start=start, end=end)  # the file first, then the model
        self.resolve()
        settings = self.settings(frames=frames, fps=fps, max_frames=max_frames)
        path, began = Path(path), time.perf_counter()
        if image:
            return Media(path, image=read_image(path), seconds=time.perf_counter() - began)
        sampler = functools.partial(self.sampler, settings)
        sampled, features = read_video(path, sampler, self.cache, timing.window(start, end))
        for warning in sampled.warnings:
            log.warning(f"{output.display(path)}: {warning}")
        return Media(path, frames=sampled, features=features, seconds=time.perf_counter() - began)

    def estimate(self, *, frames: int | None = None, max_new_tokens: int | None = None, batch_size: int = 1,
                 medium: str | None = None, quantize: str | None = None, dtype_bytes: int | None = None,
                 size: tuple[int, int] | None = None, extra: Sequence[tuple[str, Any]] = ()) -> memory.Estimate:
        """What a question of `frames` frames (the preset's by default; `medium` "image": the family's largest
        image instead) of frame `size` (the family's reference size by default) answered with up to
        `max_new_tokens` tokens, `batch_size` at a time, will need on the device: known before a weight is read
        (for a preset not downloaded yet, from its table). `extra`: the (medium, size) of each further file the
        question is about, whose positions add to the prompt (the tower sees one file at a time)."""
        if self.config is None and not (self.preset and self.preset.memory):
            self.resolve()
        settings = self.settings(frames=frames, max_new_tokens=max_new_tokens)
        video = self.preset.family.video
        images = [medium == "image" or not video, *(kind == "image" for kind, _ in extra)]
        quantize = quantize or self.quantize  # which may change what --dtype auto picks
        dtype_bytes = dtype_bytes or models.pick_dtype(self.options[1], self.device, quantize).itemsize
        run = dict(dtype_bytes=dtype_bytes, quantize=quantize, batch=batch_size, device_type=self.device.type)
        if self.config is None:
            return memory.from_table(self.preset.memory, images=images, frames=settings.frames,
                                     new_tokens=settings.max_new_tokens, **run)
        family = self.preset.family
        sizes = [size, *(found for _, found in extra)]
        parts = [family.largest_image(self.config) if image else
                 (settings.frames, video.positions(self.config, settings.frames, found))
                 for image, found in zip(images, sizes)]
        tower_tokens, tiles = max((family.tower_tokens(self.config, p // max(t, 1)), t) for t, p in parts)
        positions = sum(p for _, p in parts) + memory.TEXT
        new_tokens = min(settings.max_new_tokens, max(models.context(self.config) - positions, 0))  # decode stops there
        return memory.estimate(self.shape, positions=positions, frames=tiles, tower_tokens=tower_tokens,
                               new_tokens=new_tokens, **run)

    @functools.cached_property
    def shape(self) -> memory.Shape:
        return memory.shape_of(self.path, self.config, self.preset.family.vision_modules)

    def fit(self) -> None:
        """Refuse, with the figures and the ways out that fit, a run whose estimate passes what the device has free
        (or --max-memory): exit code 8, before a weight is read."""
        needed = self.estimate(**self.workload)
        have, room = memory.room(self.device, self.max_memory)
        if needed.total <= have:
            return
        ways = self.ways_out(have)
        advice = (f": try {' or '.join(ways)}" if ways else
                  ": nothing fits in that (no other precision, quantization, frame count or preset)")
        raise memory.OutOfMemory(f"{self.name} needs {needed} and {room}{advice}")


    def ways_out(self, have: float) -> list[str]:
        """The changes to this run that fit in `have` bytes, each with its figure, best first: a smaller
        precision, then quantization (int8 before nf4), then the most frames that fit, then the presets that fit
        (the largest first: more parameters, as a rule a better answer)."""
        ways = [*self._precisions(), *self._quantizations(), *self._fewer_frames(have), *self._presets(have)]
        return [f"{way} (~{memory.size(total)}{note})" for way, total, note in ways if total <= have]

    def _precisions(self) -> Iterator[tuple[str, float, str]]:
        if self.dtype.itemsize <= 2:
            return
        cpu = self.device.type == "cpu"
        slow = "; slower than float32 on this CPU, which does not compute bfloat16 natively"
        yield (f"--dtype {'bfloat16' if cpu else 'float16'}", self.estimate(**self.workload, dtype_bytes=2).total,
               slow if cpu and not models.cpu_has_bf16() else "")

    def _quantizations(self) -> Iterator[tuple[str, float, str]]:
        """The quantizations after this run's that run on its device (none on MPS; int4 on the CPU only)."""
        from videoqa import quantization

        for quantize in QUANTIZE[QUANTIZE.index(self.quantize) + 1:]:
            try:  # refused on this device, or for this checkpoint's widths (int4)
                name = quantization.library(quantize, self.device.type)
                total = self.estimate(**self.workload, quantize=quantize).total
                if quantize == "int4" and self.config is not None:
                    quantization.group_size(self.config.text_config)
            except VideoQAError:
                continue
            install = "" if quantization.available(name) else "; pip install 'videoqa[quant]' first"
            yield f"--quantize {quantize}", total, install

    def _fewer_frames(self, have: float) -> Iterator[tuple[str, float, str]]:
        if self.workload.get("medium") == "image" or not self.preset.family.video:
            return
        most = self.most_frames(have, self.settings(frames=self.workload.get("frames")).frames)
        if most:
            yield f"--frames {most}", self.estimate(**{**self.workload, "frames": most}).total, ""

    def most_frames(self, have: float, high: int, size: tuple[int, int] | None = None) -> int:
        """The most frames below `high` (of frame `size`) whose run fits in `have` bytes (0: none), found by
        bisection: the estimate grows with the frames."""
        run, low = {**self.workload, "size": size or self.workload.get("size")}, 0  # low fits (or is 0), high not
        while high - low > 1:
            middle = (low + high) // 2
            fits = self.estimate(**{**run, "frames": middle}).total <= have
            low, high = (middle, high) if fits else (low, middle)
        return low

    def _presets(self, have: float) -> Iterator[tuple[str, float, str]]:
        """Up to three other presets that take the medium and fit, at this run's options, the largest first."""
        medium = self.workload.get("medium") or ("video" if self.preset.family.video else "image")
        workload, fitting = {**self.workload, "medium": medium}, []
        for name, preset in models.presets().items():
            if name == self.name or "context" not in preset.memory:  # estimated from its table: nothing downloaded
                continue
            other = Checkpoint(name, device=self.options[0], dtype=self.options[1], quantize=self.quantize,
                               cache=False, check_memory=False, workload=workload)
            try:
                other.check_medium()
            except VideoQAError:  # an image-only preset for a video, or frames past its context
                continue
            total = other.estimate(**workload).total
            if total <= have:
                fitting.append((f"-m {name}", total, ""))
        yield from sorted(fitting, key=lambda way: (-way[1], way[0]))[:3]

    def load(self, *, compile: bool = True) -> Model:
        """The weights, on the device in the dtype; `compile`: the decode step with CUDA graphs (CUDA only)."""
        self.resolve()
        start = time.perf_counter()
        with memory.stage("loading the weights", ADVICE):
            net, tokenizer = models.load(self.path, self.family, self.config, self.device, self.dtype, self.quantize)
        self.loaded = True
        return Model(self, net, tokenizer, compile=compile and self.device.type == "cuda",
                     seconds=time.perf_counter() - start)


def caption_jobs(checkpoint: Checkpoint, videos: str | Path | Iterable[str | Path],
                 prompt: str | Sequence[str] | None = None, *, start: Time = None, end: Time = None,
                 **settings: Any) -> tuple[list, Settings]:
    """`Model.caption`'s jobs (batch.Job: each video, its question and the window) and settings, checked: also
    what a cluster answers (cluster.py), where the model is loaded elsewhere."""
    from videoqa.batch import Job
    from videoqa.questions import CAPTION_PROMPT, check_question

    chosen, window = checkpoint.settings(**settings), timing.window(start, end)
    checkpoint.check_videos(checkpoint.least(chosen))
    videos = [Path(videos)] if isinstance(videos, (str, Path)) else [Path(v) for v in videos]
    prompt = CAPTION_PROMPT if prompt is None else prompt
    prompts = [prompt] * len(videos) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(videos):
        raise VideoQAError(f"{len(prompts)} prompts for {len(videos)} videos: give one, or one per video")
    return [Job(video, question, window) for video, question in zip(videos, map(check_question, prompts))], chosen


def eval_jobs(checkpoint: Checkpoint, items: Sequence, **settings: Any) -> tuple[list, Settings]:
    """`Model.evaluate`'s jobs (one per evaluation.Item: its video, question, window and choices) and settings,
    checked."""
    from videoqa.batch import Job

    chosen = checkpoint.settings(**settings)
    checkpoint.check_videos(checkpoint.least(chosen))
    return [Job(item.video, item.question, timing.window(item.start, item.end), item.choices) for item in items], chosen


def judged(item, rec: dict) -> dict:
    """An item's record: the answer's, then `number`, `item` (as read), `expected` and `correct`."""
    from videoqa.evaluation import judge

    correct = None if rec["error"] is not None else judge(item.answer, rec["answer"], item.choices)
    return {**rec, "number": item.number, "item": item.fields, "expected": item.answer, "correct": correct}


def segment_jobs(checkpoint: Checkpoint, video: str | Path, question: str, settings: Settings, *,
                 every: str | float | None = None, count: int | None = None, windows: Sequence[Window] | None = None,
                 default: float) -> list:
    """A job per segment of the video: the `windows` given, or those of `every` or `count` (`default` s long
    when neither is given)."""
    from videoqa.batch import Job
    from videoqa.questions import check_question

    checkpoint.check_videos(checkpoint.least(settings))
    if windows is None:
        windows = segments(video, every=every, count=count, default=default)
    return [Job(Path(video), check_question(question), window) for window in windows]


def sheet(video: str | Path, frames: Sequence[dict], path: str | Path, *, pixels=None) -> tuple[int, int]:
    """A contact sheet (PNG at `path`) of a video's sampled `frames` as records list them ({"index", "time"},
    and "attention" under explain), each labelled with its time (and share); `pixels`: the frames already
    decoded, else they are decoded from the file. Its (width, height)."""
    from videoqa.frames import Damaged, open_video
    from videoqa.sheet import contact_sheet

    if not frames:
        raise VideoQAError(f"{output.display(video)}: no sampled frames to draw")
    if pixels is None:
        try:
            with open_video(Path(video)) as opened:
                pixels = opened.decode([frame["index"] for frame in frames])
        except Damaged:
            raise VideoQAError(f"{output.display(video)}: its frames could not be decoded again for the sheet")
    shares = [frame["attention"] for frame in frames] if "attention" in frames[0] else None
    return contact_sheet(pixels, [frame["time"] for frame in frames], path, shares=shares)


def segments(video: str | Path, *, every: str | float | None = None, count: int | None = None,
             default: str | float | None = None) -> list[Window]:
    """The consecutive windows a timeline or a search cuts `video` into: `every` seconds long (a length such as 30,
    "10s", "2m" or "1:30"; `default` when neither this nor `count` is given), or `count` equal parts; the last ends
    at the video's end. The video is opened to find its length (a file that is no video is refused here)."""
    from videoqa.frames import extent

    every = default if every is None and count is None else every
    length = None if every is None else timing.parse_duration(every)
    if length is not None and count is not None:
        raise VideoQAError("--every and --segments: give one of them")
    last, end, frames = extent(Path(video))
    return timing.segments(last, end, frames=frames, every=length, count=count)


@contextmanager
def _walker(video: str | Path, sampler: Sampler) -> Iterator[Callable]:
    """How a job's frames are read for the segments of one video: chosen by `frames` from its window by one decoder
    that walks the file forward (segments in order: a single pass, seeking past what no segment needs). The video
    is closed only once no segment is being read from it on the background thread (a run stopped early leaves one
    in flight)."""
    import threading

    from videoqa.frames import open_video

    opened, lock, closed = open_video(Path(video)), threading.Lock(), threading.Event()
    frames = sampler(opened.size)  # the rule for this video

    def read(job):
        with lock:
            if closed.is_set():  # PyAV crashes on a closed file
                raise VideoQAError(f"{video}: the run stopped before this segment was read")
            return opened.sample(frames, job.window)

    try:
        yield read
    finally:
        with lock:
            closed.set()
            opened.close()


def load(model: str | Path = "video-llava-7b", *, device: str = "auto", dtype: str = "auto", cache: bool = True,
         compile: bool = True, quantize: str = "none", max_memory: str | float | None = None,
         check_memory: bool = True) -> Model:
    """A model ready to answer: a preset name, a local Hugging Face directory or a hub id. `quantize`: none, int8,
    int4 (CPU) or nf4 (the language model's linear layers, and on a CPU its head: torchao on a CPU, bitsandbytes on
    CUDA and for nf4); `max_memory`: a cap below what the device has
    free (e.g. "6GB"); the memory check refuses a model that would not fit a default question."""
    found = Checkpoint(model, device=device, dtype=dtype, cache=cache, quantize=quantize, max_memory=max_memory,
                       check_memory=check_memory)
    return found.load(compile=compile)


class Model(Engine):
    """A loaded model: `ask`, `stream`, `chat`, `features`, `caption`. Settings (frames, or fps and max_frames;
    max_new_tokens, temperature, top_k, top_p, seed) are keywords of each."""

    def settings(self, **given: Any) -> Settings:
        return self.checkpoint.settings(**given)

    def media(self, path: str | Path, frames: int | None = None, *, fps: float | None = None,
              max_frames: int | None = None, start: Time = None, end: Time = None) -> Media:
        return self.checkpoint.media(path, frames, fps=fps, max_frames=max_frames, start=start, end=end)

    def chat(self, media: MediaArg | Sequence[MediaArg], *, start: Time = None, end: Time = None,
             **settings: Any) -> Chat:
        """A conversation about a video (or its window [start, end)) or image, or several of them at once (the
        window is the first file's): their features are computed once, its KV cache kept; `Chat.add` brings more."""
        chosen = self.settings(**settings)
        framing = {name: settings.get(name) for name in FRAMING}
        given = list(media) if isinstance(media, (list, tuple)) else [media]
        if not given:
            raise VideoQAError("no file to ask about: give a video or image, or a list of them")
        first, *others = given
        read = [self.media(item, **framing, **window) if not isinstance(item, Media) else item
                for item, window in [(first, {"start": start, "end": end}), *((other, {}) for other in others)]]
        return Chat(self, read, chosen)

    def ask(self, media: MediaArg | Sequence[MediaArg], question: str, *, start: Time = None, end: Time = None,
            choices: Sequence[str] | None = None, **settings: Any) -> Answer:
        """One question, one answer, about one file or several (`[video, image]`): a one-turn chat; with
        `choices`, the likeliest option (`Chat.choose`)."""
        framing = {name: settings.pop(name, None) for name in FRAMING}
        return self.chat(media, **framing, start=start, end=end).ask(question, choices=choices, **settings)

    def stream(self, media: MediaArg | Sequence[MediaArg], question: str, *, start: Time = None, end: Time = None,
               **settings: Any) -> Iterator[str]:
        """The answer's text as it is generated."""
        framing = {name: settings.pop(name, None) for name in FRAMING}
        yield from self.chat(media, **framing, start=start, end=end).stream(question, **settings)

    def features(self, media: str | Path | Media, frames: int | None = None, *, fps: float | None = None,
                 max_frames: int | None = None, start: Time = None, end: Time = None):
        """Projected visual features, (positions, hidden): what is spliced over the placeholder; a video embedding."""
        if not isinstance(media, Media):
            media = self.media(media, frames, fps=fps, max_frames=max_frames, start=start, end=end)
        return self.encode(media).rows

    def embed(self, media: str | Path | Media, frames: int | None = None, *, fps: float | None = None,
              max_frames: int | None = None, start: Time = None, end: Time = None):
        """A video's (or image's) embedding for search and clustering: the mean of its projected visual features
        (the rows spliced over the placeholder), scaled to unit length so a dot product is the cosine. (D,)
        float32, on the CPU."""
        rows = self.features(media, frames, fps=fps, max_frames=max_frames, start=start, end=end)
        pooled = rows.float().mean(0)
        return (pooled / pooled.norm().clamp(min=1e-12)).cpu()

    def sheet(self, video: str | Path, frames: Sequence[dict], path: str | Path, *, pixels=None) -> tuple[int, int]:
        """A contact sheet of a video's sampled `frames` (see `sheet`)."""
        return sheet(video, frames, path, pixels=pixels)

    def caption(self, videos: str | Path | Iterable[str | Path], prompt: str | Sequence[str] | None = None, *,
                start: Time = None, end: Time = None, batch_size: int = 4,
                interrupted: Callable[[], bool] = lambda: False,
                stats: dict | None = None, **settings: Any) -> Iterator[dict]:
        """One record per video (the `--json` schema, `error` set for a video that could not be answered), in
        order. `videos`: paths, or one path. `prompt`: one question for every video ("Describe this video." by
        default), or one per video; [start, end): the window of each video.
        Videos are decoded ahead on background threads and answered `batch_size` at a time; `interrupted()` is asked
        after each batch. A batch that runs out of memory is answered in halves; `stats["backoffs"]` counts how
        often."""
        from videoqa.batch import records

        jobs, chosen = caption_jobs(self.checkpoint, videos, prompt, start=start, end=end, **settings)
        yield from records(self, jobs, chosen, batch_size, interrupted, {} if stats is None else stats)

    def evaluate(self, items: Sequence, *, batch_size: int = 4, interrupted: Callable[[], bool] = lambda: False,
                 stats: dict | None = None, **settings: Any) -> Iterator[dict]:
        """One record per item (an evaluation.Item: `videoqa.evaluation.read_items` reads a benchmark's file), in
        order: the `--json` schema with the answer generated, or, for an item with choices, the likeliest option
        and every option's score (`choices`); then `number` and `item` (the item as read), `expected` (its answer)
        and `correct` (None without one, or for an error record). Batched as `caption`."""
        from videoqa.batch import records

        jobs, chosen = eval_jobs(self.checkpoint, items, **settings)
        for item, rec in zip(items, records(self, jobs, chosen, batch_size, interrupted, {} if stats is None else stats)):
            yield judged(item, rec)

    def timeline(self, video: str | Path, prompt: str | None = None, *, every: str | float | None = None,
                 count: int | None = None, windows: Sequence[Window] | None = None, batch_size: int = 4,
                 interrupted: Callable[[], bool] = lambda: False, stats: dict | None = None,
                 **settings: Any) -> Iterator[dict]:
        """One record per segment of the video, in order: the `--json` schema plus the segment's `start` and `end`
        (s). Segments last `every` (30 s unless `count` equal parts or the `windows` are given); `prompt` is the
        preset's describe prompt by default. The segments' frames are decoded ahead in one forward pass over the
        file, on a background thread, and answered `batch_size` at a time; `interrupted()` is asked after each batch, and
        `stats` counts out-of-memory back-offs as `caption`'s does."""
        from videoqa.batch import records

        chosen = self.settings(**settings)
        jobs = segment_jobs(self.checkpoint, video, prompt or self.preset.describe, chosen, every=every, count=count,
                            windows=windows, default=30)
        with _walker(video, functools.partial(self.checkpoint.sampler, chosen)) as read:
            answered = records(self, jobs, chosen, batch_size, interrupted, {} if stats is None else stats, read=read,
                               workers=1)
            for rec, job in zip(answered, jobs):
                yield {**rec, "start": job.window.start, "end": job.window.end}

    def find(self, video: str | Path, query: str, *, every: str | float | None = None, count: int | None = None,
             windows: Sequence[Window] | None = None, batch_size: int = 4, frames: int | None = None,
             fps: float | None = None, max_frames: int | None = None) -> list[dict]:
        """How well each segment of the video (10 s long unless `every`, `count` or `windows` say otherwise) shows
        `query`, without generating text: the model is prefilled with the template and FIND's question, and the
        score is P(yes) / (P(yes) + P(no)) of its next token. One {"start", "end", "score", "frames", "warnings",
        "error"} per segment, in time order (`score` None and `error` set where a segment could not be read)."""
        from videoqa.batch import scores
        from videoqa.families import FIND
        from videoqa.questions import check_question

        chosen = self.settings(frames=frames, fps=fps, max_frames=max_frames)
        self.answer_ids  # noqa: B018 (a tokenizer that cannot tell the answers apart is refused before any frame)
        question = FIND.format(query=check_question(query).rstrip(".?! "))
        jobs = segment_jobs(self.checkpoint, video, question, chosen, every=every, count=count, windows=windows,
                            default=10)
        with _walker(video, functools.partial(self.checkpoint.sampler, chosen)) as read:
            return list(scores(self, jobs, read, batch_size, workers=1))

    def encode(self, media: Media):
        """The media's features (a features.Visual): from the cache, or through the vision tower (then kept in the
        cache)."""
        from videoqa.features import visual

        net, times = self.net, media.frames.times if media.frames is not None else ()
        if media.features is not None:  # a Visual from the cache, the frames' times with it
            return media.features.to(net.device, net.dtype)
        with memory.stage("the vision tower", ADVICE):
            if media.image is not None:
                return visual(self.family.image_features(net, media.image))
            features = self.video_features(self.family.video.pixels(net.config, media.frames.pixels), times)
        cache = self.checkpoint.cache
        # a pipe (read through a copy) is not kept: its content, the key, cannot be read again
        problem = cache.put(media.path, media.frames, features) if cache and media.path.is_file() else None
        if problem:
            log.warning(problem)
        return features


class Chat:
    """Videos and images and what was said about them: their features (each computed once), the ids of the whole
    conversation, and one static KV cache that holds them. A file added (`add`) joins the next question's turn;
    the earlier turns, their media and the cache stay as they are."""

    def __init__(self, model: Model, media: Media | Sequence[Media], settings: Settings):
        self.model, self.settings = model, settings
        self.held: list[tuple[Media, Any]] = []  # every file, in the order given, with its features.Visual
        self.pending = {**model.pending, "frames": 0.0, "vision": 0.0}  # reported with the next answer
        model.pending = {"load": 0.0}
        self.reset()
        for medium in [media] if isinstance(media, Media) else media:
            self._hold(medium)
        self.media = self.held[0][0]  # the first file: an answer's `video`

    def add(self, media: str | Path | Media, *, start: Time = None, end: Time = None, **framing: Any) -> Media:
        """Bring a video (its window [start, end)) or image into the conversation: it is read (unless it already
        is) and encoded, and the next question's turn places it (before its text, as the family's template
        does). What was said, the cache and the earlier files' features are kept. A file the model cannot take,
        or one that leaves the conversation no room in the context, is refused and not added."""
        if not isinstance(media, Media):
            chosen = {name: framing.get(name, self.settings.get(name)) for name in FRAMING}
            if chosen["fps"] is not None:
                chosen["frames"] = None
            media = self.model.media(media, **chosen, start=start, end=end)
        self._hold(media)
        needed = len(self.next_ids(""))
        if needed >= self.model.context:
            self.held.pop()
            self.waiting.pop()
            raise VideoQAError(f"{output.display(media.path)}: with it the conversation needs {needed} positions and "
                               f"the model's context holds {self.model.context}; /reset or a shorter part first")
        return media

    def _hold(self, media: Media) -> None:
        """Encode a file, keep it, and leave it for the next turn."""
        start = time.perf_counter()
        visual = self.model.encode(media)
        if self.model.net.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.pending["frames"] += media.seconds
        self.pending["vision"] += time.perf_counter() - start
        self.held.append((media, visual))
        self.waiting.append((media, visual))

    def reset(self) -> None:
        """Forget what was said; keep the files' features (the next question's turn places them all again)."""
        self.ids: list[int] = []  # the whole conversation: prompts and answers
        self.cache = None  # holds a prefix of self.ids
        self.answers: list[Answer] = []
        self.placed: list = []  # the Visuals self.ids holds, in prompt order
        self.waiting = list(self.held)  # (Media, Visual) the next turn places

    @property
    def video(self) -> Media | None:
        """The conversation's first video: the frames an answer lists, /frames shows and a sheet draws."""
        return next((media for media, _ in self.held if media.frames is not None), None)

    def restore(self, turns: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Go on from a conversation kept elsewhere (`videoqa chat --continue`: the history): each (question,
        answer tokens) turn is taken as answered (`take`), nothing is generated. The KV cache is dropped, so the
        next question prefills the whole conversation."""
        self.reset()
        for question, tokens in turns:
            self.take(question, tokens)

    def take(self, question: str, tokens: Sequence[int]) -> None:
        """One turn taken as answered with `tokens`, the files waiting placed in it, as `tokens` would have left
        it; the cache is dropped."""
        ids, turn = self.next_ids(question), self._turn(question, [])
        tokens = [int(t) for t in tokens]
        turn.tokens, turn.text = tokens, self.model.decode(tokens)
        self.cache = None
        self._commit(ids + tokens, turn)

    def retake(self, tokens: Sequence[int]) -> None:
        """The last answer as `tokens` from here on (what a server's next request gives back as text, tokenized
        again), so the conversation goes on as one rebuilt from that text would; the KV cache keeps the part it
        shares with them (all of it when the text tokenizes back to what was generated)."""
        from videoqa.decode import truncate

        ids = self.ids[: len(self.ids) - len(self.answers[-1].tokens)] + [int(t) for t in tokens]
        same = next((i for i, (a, b) in enumerate(zip(ids, self.ids)) if a != b), min(len(ids), len(self.ids)))
        if self.cache is not None:
            truncate(self.cache, min(same, int(self.cache.get_seq_length())))
        self.ids = ids

    def _commit(self, ids: list[int], turn: Answer) -> None:
        """The turn answered: the conversation goes on from `ids`, its waiting files placed."""
        self.ids, self.placed, self.waiting = ids, self.visuals(), []
        self.answers.append(turn)

    def visuals(self) -> list:
        """The features of the conversation's files in prompt order: those placed, then the next turn's."""
        return [*self.placed, *(visual for _, visual in self.model.in_order(self.waiting))]

    def _template(self) -> str:
        preset, new = self.model.preset, bool(self.waiting)
        return preset.template if not self.ids else preset.followup_media if new else preset.followup

    def turn_text(self, question: str) -> str:
        """This turn's text as given to the model, each new file's placeholder once (a follow-up's has none)."""
        new = [visual for _, visual in self.model.in_order(self.waiting)]
        return self.model.turn_text(self._template(), question, new)

    def next_ids(self, question: str) -> list[int]:
        """The conversation so far plus the new question (and the files waiting), in the preset's multi-turn
        format."""
        new = [visual for _, visual in self.model.in_order(self.waiting)]
        turn = self.model.turn_ids(self._template(), question, new, first=not self.ids)
        if not self.ids:
            return turn
        eos = [self.model.tokenizer.eos_token_id] if self.ids[-1] != self.model.tokenizer.eos_token_id else []
        return [*self.ids, *eos, *turn]

    def _turn(self, question: str, warnings: list[str]) -> Answer:
        """An Answer for this turn, before it is answered: its files, prompt and the first video's frames."""
        video = self.video
        files = [media.path for media, _ in self.held]
        return Answer(video=self.media.path, question=question, prompt=self.turn_text(question), text="",
                      tokens=[], frames=video.frames.listed() if video else [], model=self.model.name,
                      runtime=self.model.runtime, media=files,
                      warnings=[*(w for m, _ in self.held if m.frames for w in m.frames.warnings), *warnings])

    def ask(self, question: str, *, choices: Sequence[str] | None = None, **settings: Any) -> Answer:
        """The answer to `question`; with `choices`, the option the model finds likeliest (see `choose`); what else
        the answer can carry (hidden states, attention weights, frame attention): see `tokens`."""
        if choices is not None:
            traced = [name for name in ("logprobs", "hidden_states", "attentions", "explain")
                      if settings.get(name) is not None and settings.get(name) is not False]
            if traced:
                raise VideoQAError(f"choices and {', '.join(traced)}: the options are scored, no answer is generated "
                                   "to carry them (each option's log-probability is in `choices`)")
            return self.choose(question, choices)
        for _ in self.tokens(question, **settings):
            pass
        return self.answers[-1]

    def choose(self, question: str, choices: Sequence[str]) -> Answer:
        """Each option scored by the summed log-probability of its tokens as the answer (and the mean per token),
        the prompt (its files included) prefilled once; the answer is the best option. The conversation does not
        go on from it (the options are cut back off the cache; files waiting still wait)."""
        from videoqa.decode import truncate
        from videoqa.questions import check_question

        question = check_question(question)
        ids, turn = self.next_ids(question), self._turn(question, [])
        cached = int(self.cache.get_seq_length()) if self.cache is not None else 0
        start = time.perf_counter()
        try:
            scored, best = self.model.choose(ids, self.visuals(), turn.prompt, choices, self._cache_for,
                                             follow_up=bool(self.ids))
        finally:  # the options are cut back in score(); the prompt too: the conversation does not go on from it
            if self.cache is not None:
                truncate(self.cache, cached)
        turn.text, turn.tokens, turn.choices = best["text"], best["tokens"], scored
        turn.timings = {**self.pending, "prefill": time.perf_counter() - start, "prefill_tokens": len(ids) - cached}
        return turn

    def sheet(self, path: str | Path) -> tuple[int, int]:
        """A contact sheet (PNG at `path`) of the first video's sampled frames, with the last answer's attention
        shares when it was asked with `explain`. Its (width, height)."""
        video = self.video
        if video is None:
            raise VideoQAError("a contact sheet is of a video's frames; this conversation has no video")
        listed = self.answers[-1].frames if self.answers else video.frames.listed()
        return self.model.sheet(video.path, listed, path, pixels=video.frames.pixels)

    def stream(self, question: str, **settings: Any) -> Iterator[str]:
        """The answer's text as it is generated; stopping early drops the turn (`settings` as `tokens` takes
        them)."""
        tokens = self.tokens(question, **settings)
        stop = self.settings.changed(**{k: v for k, v in settings.items() if k == "stop"}).stop
        try:
            yield from output.texts(tokens, self.model.tokenizer, stop)
        finally:
            tokens.close()

    def tokens(self, question: str, *, hidden_states: bool | Sequence[int] = False, attentions: bool = False,
               explain: bool = False, **settings: Any) -> Iterator[int]:
        """The answer's token ids as they are generated. The question and its fit in the context are checked
        before the first is asked for; closing the iterator early drops the turn (the cache is cut back).
        The Answer then carries, as asked: `hidden_states` (True: every layer's, embeddings first; or the layer
        indices) at the position that chose each token; `attentions`, that position's attention weights (the
        language model runs eager attention for it); `explain`, each frame's share of that attention in `frames`."""
        from videoqa.questions import check_question

        if set(settings) & set(FRAMING):
            raise VideoQAError("frames, fps, max_frames: a conversation's media is read already; they apply to the "
                               "next one")
        chosen = self.settings.changed(**{k: v for k, v in settings.items() if v is not None})
        question = check_question(question)
        ids = self.next_ids(question)
        self.model.check_fits(len(ids), follow_up=bool(self.ids))
        budget, cut = self.model.budget(chosen.max_new_tokens, len(ids))
        turn = self._turn(question, cut)
        trace = self._trace(ids, chosen, hidden_states=hidden_states, attentions=attentions, explain=explain)
        return self._answer(turn, ids, budget, chosen, trace)

    def _trace(self, ids: list[int], settings: Settings, *, hidden_states: bool | Sequence[int], attentions: bool,
               explain: bool):
        """What this turn's decode steps are to carry (traces.Trace), checked before anything runs."""
        from videoqa.traces import Trace, frame_spans, layers_of

        text = self.model.net.config.text_config
        layers = layers_of(hidden_states, text.num_hidden_layers + 1)
        spans = None
        if explain:
            if len(self.held) > 1:
                raise VideoQAError(f"--explain: the attention is shared out over one video's frames; this "
                                   f"conversation holds {len(self.held)} files")
            (media, visual), = self.held
            if media.frames is None:
                raise VideoQAError("--explain: the attention is shared out over a video's frames; an image has none")
            spans = frame_spans(ids, self.model.tokenizer.convert_tokens_to_ids(self.model.placeholder(visual)),
                                len(media.frames.times), visual.grid)
        return Trace(logprobs=settings.logprobs, hidden_states=layers, attentions=attentions, spans=spans)

    def _cache_for(self, length: int):
        """The static KV cache, able to hold `length` tokens: preallocated, then moved up a bucket when outgrown.
        (Static also when eager: in place updates beat a dynamic cache's growing copies once the prompt is long.)"""
        from videoqa.decode import capacity, grown, static_cache

        text = self.model.net.config.text_config
        if self.cache is None:
            self.cache = static_cache(text, length)
        elif capacity(self.cache) < length:
            self.cache = grown(text, self.cache, length)
        return self.cache

    def _answer(self, turn: Answer, ids: list[int], budget: int, settings: Settings, trace) -> Iterator[int]:
        from videoqa.decode import truncate
        from videoqa.traces import eager_attention

        cache = self._cache_for(len(ids) + budget)
        cached = int(cache.get_seq_length())
        timings = {**self.pending, "prefill": 0.0, "decode": 0.0, "decode_tokens_per_s": 0.0,
                   "prefill_tokens": len(ids) - cached}
        start = first = time.perf_counter()
        answer: list[int] = []
        try:
            with eager_attention(self.model.net, self.model.lm.body, trace.wanted):
                steps = self.model.generate([ids], self.visuals(), cache, budget, settings, trace.wanted)
                for step in steps:
                    if not answer:
                        first = time.perf_counter()
                        timings["prefill"] = first - start
                    trace.add(step)
                    answer.append(int(step.token[0]))
                    stopped = self.model.stopped(answer, settings.stop)
                    yield answer[-1]
                    if stopped:
                        steps.close()
                        break
        except BaseException as e:  # Ctrl-C, an abandoned answer or no memory: the turn is dropped, the cache cut back
            truncate(cache, cached)
            if memory.is_oom(e):
                raise memory.OutOfMemory(f"out of memory during {'decode' if answer else 'prefill'}: {ADVICE}") from None
            raise
        if len(answer) > 1:
            timings["decode"] = time.perf_counter() - first
            timings["decode_tokens_per_s"] = (len(answer) - 1) / timings["decode"]
        self.pending = {"load": 0.0, "frames": 0.0, "vision": 0.0}
        turn.tokens, turn.text, turn.timings = answer, self.model.decode(answer, settings.stop), timings
        self._carry(turn, trace, ids[-1])
        self._commit(ids + answer, turn)

    def _carry(self, turn: Answer, trace, before: int) -> None:
        """What the turn's steps carried, onto its Answer (`before`: the token before the answer)."""
        count = len(turn.tokens)
        turn.logprobs = trace.logprobs(self.model.tokenizer, 0, turn.tokens, before)
        turn.hidden_states = trace.hidden_states(0, count)
        turn.attentions = trace.attention_weights(0, count)
        shares = trace.frame_attention(count)
        if shares is not None:
            turn.frames = [{**frame, "attention": share} for frame, share in zip(turn.frames, shares)]


def together(chats: Sequence[Chat], questions: Sequence[str], settings: Sequence[dict[str, Any]], *,
             alive: Callable[[int], bool] = lambda row: True) -> Iterator[tuple[int, int]]:
    """Several conversations' next turns answered in one batch on the batched decode path (rows left-padded, each
    ending on its own), for a server's requests that arrive together: (row, token) as each is generated. A row
    ends at its EOS, its stop string or its max_new_tokens, or once `alive(row)` is false (that turn is dropped).
    Then each Chat goes on from its answer holding its own row of the batch's KV cache, as if it had been
    answered alone. The Chats hold no cache yet (a new conversation, or one rebuilt); the rows share one sampler
    and one trace, so their sampling and logprobs settings must be the same (greedy answers equal each alone)."""
    from videoqa.decode import row_cache, static_cache
    from videoqa.questions import check_question
    from videoqa.traces import Trace

    model = chats[0].model
    chosen = [chat.settings.changed(**{k: v for k, v in given.items() if v is not None})
              for chat, given in zip(chats, settings)]
    if any(chat.cache is not None for chat in chats) or len({(c.sampling, c.logprobs) for c in chosen}) > 1:
        raise VideoQAError("together: conversations without a cache, with the same sampling and logprobs")
    questions = [check_question(question) for question in questions]
    ids = [chat.next_ids(question) for chat, question in zip(chats, questions)]
    for row in ids:
        model.check_fits(len(row))
    budgets, cuts = zip(*(model.budget(c.max_new_tokens, len(row)) for c, row in zip(chosen, ids)))
    turns = [chat._turn(question, list(cut)) for chat, question, cut in zip(chats, questions, cuts)]
    width, trace = max(map(len, ids)), Trace(logprobs=chosen[0].logprobs)
    cache = static_cache(model.net.config.text_config, width + max(budgets))
    answers: list[list[int]] = [[] for _ in ids]
    ended, dropped = [budget == 0 for budget in budgets], [False] * len(ids)
    start, prefill = time.perf_counter(), 0.0
    steps = model.generate(ids, [v for chat in chats for v in chat.visuals()], cache, max(budgets), chosen[0],
                           trace.wanted)
    for i, step in enumerate(steps):
        prefill = prefill if i else time.perf_counter() - start
        trace.add(step)
        for row, token in enumerate(step.token.tolist()):
            dropped[row] = dropped[row] or (not ended[row] and not alive(row))
            if not (ended[row] or dropped[row]):
                answers[row].append(token)
                yield row, token
                ended[row] = (token == model.tokenizer.eos_token_id or len(answers[row]) == budgets[row]
                              or model.stopped(answers[row], chosen[row].stop))
        if all(e or d for e, d in zip(ended, dropped)):
            steps.close()
            break
    decode = time.perf_counter() - start - prefill
    for row, (chat, turn, answer) in enumerate(zip(chats, turns, answers)):
        if dropped[row]:
            continue
        turn.tokens, turn.text = answer, model.decode(answer, chosen[row].stop)
        turn.logprobs = trace.logprobs(model.tokenizer, row, answer, ids[row][-1])
        turn.timings = {**chat.pending, "prefill": prefill, "decode": decode, "prefill_tokens": len(ids[row]),
                        "decode_tokens_per_s": (len(answer) - 1) / decode if len(answer) > 1 and decode else 0.0}
        chat.pending = {"load": 0.0, "frames": 0.0, "vision": 0.0}
        chat.cache = row_cache(model.net.config.text_config, cache, len(ids[row]) + budgets[row], row=row,
                               start=width - len(ids[row]), end=width + max(len(answer) - 1, 0))
        chat._commit(ids[row] + answer, turn)
