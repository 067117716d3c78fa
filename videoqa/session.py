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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videoqa import memory, models, output
from videoqa.errors import VideoQAError
from videoqa.frames import Frames, check_file, is_image, read_image
from videoqa.settings import Settings, defaults

log = logging.getLogger("videoqa")


@dataclass
class Media:
    """A video's sampled frames or a still image, read and checked; with its features when the cache had them."""

    path: Path
    frames: Frames | None = None
    image: Any = None  # a PIL image
    features: Any = None  # (positions, D) from the feature cache
    seconds: float = 0.0  # reading it (or finding it in the cache)


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

    def record(self) -> dict:
        """The `--json` schema (README: Scripting)."""
        return output.record(video=self.video, question=self.question, prompt=self.prompt, answer=self.text,
                             tokens=self.tokens, frames=self.frames, model=self.model, runtime=self.runtime,
                             timings=self.timings)


class Checkpoint:
    """A model to be loaded: resolved and checked on first need (its preset, family, config, device, dtype and
    feature cache), so that a bad file is refused before the model is looked for, and both before the load."""

    def __init__(self, model: str | Path = "video-llava-7b", *, device: str = "auto", dtype: str = "auto",
                 cache: bool = True, quantize: str = "none", max_memory: str | float | None = None,
                 check_memory: bool = True, workload: dict[str, int | None] | None = None):
        if quantize not in models.QUANTIZE:
            raise VideoQAError(f"quantize {quantize!r}: one of {', '.join(models.QUANTIZE)}")
        self.name, self.options, self.resolved = str(model), (device, dtype, cache), False
        self.quantize, self.check_memory, self.workload = quantize, check_memory, workload or {}
        self.max_memory = memory.parse_size(max_memory) if isinstance(max_memory, str) else max_memory
        self.preset = models.presets().get(self.name)  # a directory or hub id: its family's defaults, once resolved
        self.path = self.config = None  # known once resolved (a preset's table stands in until it is downloaded)

    @functools.cached_property
    def device(self):
        return models.pick_device(self.options[0])

    @functools.cached_property
    def dtype(self):
        return models.pick_dtype(self.options[1], self.device)

    def resolve(self) -> Checkpoint:
        """Pick the device and dtype, check that the run described by `workload` (frames, max_new_tokens,
        batch_size) fits (from a preset's table before downloading it, then from the checkpoint), find the model
        (downloading it if needed) and check it. Once."""
        from videoqa.cache import open_cache

        if self.resolved:
            return self
        self.dtype  # noqa: B018 (an unavailable device is refused first, before the model is looked for)
        if self.check_memory and self.preset and models.will_download(self.preset):
            self.fit()  # before a download of many gigabytes
        self.path, self.preset = models.resolve(self.name)
        self.family = self.preset.family
        self.config = models.config_of(self.path, self.family)
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

    def check_videos(self, frames: int) -> None:
        """Refuse videos for an image-only family, and frames whose video alone fills the context."""
        if not self.resolve().family.video:
            raise VideoQAError(f"{self.name} ({self.family.name}) answers about still images only, not videos: "
                               "give it an image")
        needed = self.family.video.positions(self.config, frames)
        if needed >= self.context:
            raise VideoQAError(
                f"--frames {frames}: the video alone needs {needed} positions and the model's context holds "
                f"{self.context}; use at most {self.family.video.max_frames(self.config, self.context)} frames"
            )

    def media(self, path: str | Path, frames: int | None = None) -> Media:
        """A video (`frames` sampled, the preset's count by default) or an image, read and checked."""
        from videoqa.cache import read_video

        path = Path(path)
        check_file(path)
        self.resolve()
        start = time.perf_counter()
        if is_image(path):
            return Media(path, image=read_image(path), seconds=time.perf_counter() - start)
        frames = frames or self.preset.frames
        self.check_videos(frames)
        sampled, features = read_video(path, frames, self.cache)
        return Media(path, frames=sampled, features=features, seconds=time.perf_counter() - start)

    def estimate(self, *, frames: int | None = None, max_new_tokens: int | None = None, batch_size: int = 1,
                 quantize: str | None = None, dtype_bytes: int | None = None) -> memory.Estimate:
        """What a question of `frames` frames (the preset's by default) answered with up to `max_new_tokens`
        tokens, `batch_size` at a time, will need on the device: known before a weight is read (for a preset
        not downloaded yet, from its table)."""
        if self.config is None and not (self.preset and self.preset.memory):
            self.resolve()
        settings = self.settings(frames=frames, max_new_tokens=max_new_tokens)
        run = dict(dtype_bytes=dtype_bytes or self.dtype.itemsize, quantize=quantize or self.quantize,
                   new_tokens=settings.max_new_tokens, batch=batch_size, device_type=self.device.type)
        video = self.preset.family.video
        if self.config is None:
            return memory.from_table(self.preset.memory, video=bool(video), frames=settings.frames, **run)
        vision = self.config.vision_config
        tower_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        tiles = settings.frames if video else 5  # an image-only family's largest AnyRes image: 5 tiles
        positions = video.positions(self.config, tiles) if video else tiles * tower_tokens
        shape = memory.shape_of(self.path, self.config, self.preset.family.vision_modules)
        return memory.estimate(shape, positions=positions + memory.TEXT, frames=tiles, tower_tokens=tower_tokens,
                               **run)

    def fit(self) -> None:
        """Refuse, with the figures and a way out, a run whose estimate passes what the device has free (or
        --max-memory): exit code 8, before a weight is read."""
        needed = self.estimate(**self.workload)
        have, where = memory.free(self.device)
        room = f"{where} has {memory.size(have)} free"
        if self.max_memory is not None and self.max_memory < have:
            have, room = self.max_memory, f"--max-memory allows {memory.size(self.max_memory)}"
        if needed.total <= have:
            return
        ways = self.ways_out()
        raise memory.OutOfMemory(f"{self.name} needs {needed} and {room}" + (f": try {' or '.join(ways)}" if ways else ""))

    def ways_out(self) -> list[str]:
        """What would need less: nf4, fewer frames, the smallest model, with what each needs."""
        ways = [] if self.quantize == "nf4" else [
            f"--quantize nf4 (~{memory.size(self.estimate(**self.workload, quantize='nf4').total)})"]
        if self.preset.family.video and (self.workload.get("frames") or self.preset.frames) > 4:
            ways.append("--frames 4")
        if self.name != SMALLEST and SMALLEST in models.presets():
            small = Checkpoint(SMALLEST, device=self.options[0], dtype=self.options[1], check_memory=False)
            ways.append(f"-m {SMALLEST} (~{memory.size(small.estimate(**self.workload).total)})")
        return ways

    def load(self, *, compile: bool = True) -> Model:
        """The weights, on the device in the dtype; `compile`: the decode step with CUDA graphs (CUDA only)."""
        self.resolve()
        start = time.perf_counter()
        with memory.stage("loading the weights", ADVICE):
            net, tokenizer = models.load(self.path, self.family, self.config, self.device, self.dtype, self.quantize)
        return Model(self, net, tokenizer, compile=compile and self.device.type == "cuda",
                     seconds=time.perf_counter() - start)


ADVICE = "try --quantize nf4, fewer --frames, a smaller --batch-size, or -m llava-onevision-0.5b"
SMALLEST = "llava-onevision-0.5b"  # the preset that runs on any laptop: suggested when a model does not fit


def load(model: str | Path = "video-llava-7b", *, device: str = "auto", dtype: str = "auto", cache: bool = True,
         compile: bool = True, quantize: str = "none", max_memory: str | float | None = None,
         check_memory: bool = True) -> Model:
    """A model ready to answer: a preset name, a local Hugging Face directory or a hub id. `quantize`: none, int8
    or nf4 (the language model's linear layers; bitsandbytes); `max_memory`: a cap below what the device has
    free (e.g. "6GB"); the memory check refuses a model that would not fit a default question."""
    found = Checkpoint(model, device=device, dtype=dtype, cache=cache, quantize=quantize, max_memory=max_memory,
                       check_memory=check_memory)
    return found.load(compile=compile)


class Model:
    """A loaded model: `ask`, `stream`, `chat`, `features`, `caption`. Settings (frames, max_new_tokens,
    temperature, top_k, top_p, seed) are keywords of each."""

    def __init__(self, checkpoint: Checkpoint, net, tokenizer, *, compile: bool, seconds: float):
        self.checkpoint, self.net, self.tokenizer, self.compiled = checkpoint, net, tokenizer, compile
        self.name, self.family, self.preset = checkpoint.name, checkpoint.family, checkpoint.preset
        self.lm = self.family.language_model(net)
        self.pending = {"load": seconds}  # reported with the first answer
        self.runtime = {"device": str(net.device), "dtype": str(checkpoint.dtype).removeprefix("torch."),
                        "quantize": checkpoint.quantize}

    @property
    def context(self) -> int:
        return self.checkpoint.context

    def settings(self, **given: Any) -> Settings:
        return self.checkpoint.settings(**given)

    def media(self, path: str | Path, frames: int | None = None) -> Media:
        return self.checkpoint.media(path, frames)

    def chat(self, media: str | Path | Media, **settings: Any) -> Chat:
        """A conversation about one video or image: its features are computed once, its KV cache kept."""
        chosen = self.settings(**settings)
        if not isinstance(media, Media):
            media = self.media(media, chosen.frames)
        return Chat(self, media, chosen)

    def ask(self, media: str | Path | Media, question: str, **settings: Any) -> Answer:
        """One question, one answer: a one-turn chat."""
        frames = settings.pop("frames", None)
        return self.chat(media, frames=frames).ask(question, **settings)

    def stream(self, media: str | Path | Media, question: str, **settings: Any) -> Iterator[str]:
        """The answer's text as it is generated."""
        frames = settings.pop("frames", None)
        yield from self.chat(media, frames=frames).stream(question, **settings)

    def features(self, media: str | Path | Media, frames: int | None = None):
        """Projected visual features, (positions, hidden): what is spliced over the placeholder; a video embedding."""
        if not isinstance(media, Media):
            media = self.media(media, frames)
        return self.encode(media)

    def caption(self, videos: Iterable[str | Path], prompt: str | Sequence[str] = "Describe this video.", *,
                batch_size: int = 4, stop: Callable[[], bool] = lambda: False, stats: dict | None = None,
                **settings: Any) -> Iterator[dict]:
        """One record per video (the `--json` schema, `error` set for a video that could not be answered), in
        order. `prompt`: one question for every video, or one per video. Videos are decoded ahead on background
        threads and answered `batch_size` at a time; `stop()` is asked after each batch. A batch that runs out of
        memory is answered in halves; `stats["backoffs"]` counts how often."""
        from videoqa.batch import records
        from videoqa.questions import check_question

        chosen = self.settings(**settings)
        self.checkpoint.check_videos(chosen.frames)
        videos = [Path(v) for v in videos]
        prompts = [prompt] * len(videos) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(videos):
            raise VideoQAError(f"{len(prompts)} prompts for {len(videos)} videos: give one, or one per video")
        jobs = list(zip(videos, map(check_question, prompts)))
        yield from records(self, jobs, chosen, batch_size, stop, {} if stats is None else stats)

    def encode(self, media: Media):
        """The media's features: from the cache, or through the vision tower (then kept in the cache)."""
        net = self.net
        if media.features is not None:
            return media.features.to(net.device, net.dtype)
        with memory.stage("the vision tower", ADVICE):
            if media.image is not None:
                return self.family.image_features(net, media.image)
            video = self.family.video
            features = video.features(net, video.pixels(net.config, media.frames.pixels))
        cache = self.checkpoint.cache
        # a pipe (read through a copy) is not kept: its content, the key, cannot be read again
        problem = cache.put(media.path, media.frames, features) if cache and media.path.is_file() else None
        if problem:
            log.warning(problem)
        return features

    def check_fits(self, needed: int, follow_up: bool = False) -> None:
        """Refuse a prompt that leaves no room in the model's context for even one answer token."""
        if needed >= self.context:
            what = "conversation too long: it" if follow_up else "question too long: the prompt"
            hint = "; /reset to start over" if follow_up else ""
            raise VideoQAError(f"{what} needs {needed} tokens and the model's context holds {self.context}{hint}")

    def generate(self, rows: list[list[int]], features, placeholder: str, cache, budget: int,
                 settings: Settings) -> Iterator:
        """The one decode path: rows of ids (left-padded into `cache` when their lengths differ) with `features`
        spliced over their `placeholder` positions, prefilled, then decoded token by token ((B,) ids per step)."""
        from videoqa.decode import compiled_step, decode_step, generate
        from videoqa.prompt import left_pad, splice

        ids, padding = left_pad(rows, self.pad_id, self.net.device)
        embeds = splice(self.lm.embed, ids, features, self.tokenizer.convert_tokens_to_ids(placeholder))
        step = compiled_step() if self.compiled else decode_step
        return generate(self.lm, embeds, cache, budget, self.tokenizer.eos_token_id, settings.sampling, padding, step)

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class Chat:
    """One video or image and what was said about it: its features (computed once), the ids of the whole
    conversation, and one static KV cache that holds them."""

    def __init__(self, model: Model, media: Media, settings: Settings):
        self.model, self.media, self.settings = model, media, settings
        start = time.perf_counter()
        self.features = model.encode(media)
        if model.net.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.pending = {**model.pending, "frames": media.seconds, "vision": time.perf_counter() - start}
        model.pending = {"load": 0.0}
        self.placeholder = model.family.video_token if media.frames is not None else model.family.image_token
        self.answers: list[Answer] = []
        self.reset()

    def reset(self) -> None:
        """Forget what was said; keep the media's features."""
        self.ids: list[int] = []  # the whole conversation: prompts and answers
        self.cache = None  # holds a prefix of self.ids
        self.answers = []

    def next_ids(self, question: str) -> list[int]:
        """The conversation so far plus the new question, in the preset's multi-turn format."""
        from videoqa.prompt import prompt_ids, text_ids

        tokenizer, preset = self.model.tokenizer, self.model.preset
        if not self.ids:
            return prompt_ids(tokenizer, preset.template, question, self.placeholder, self.features.shape[0])
        eos = [tokenizer.eos_token_id] if self.ids[-1] != tokenizer.eos_token_id else []
        return [*self.ids, *eos, *text_ids(tokenizer, preset.followup.format(question=question))]

    def ask(self, question: str, **settings: Any) -> Answer:
        for _ in self.tokens(question, **settings):
            pass
        return self.answers[-1]

    def stream(self, question: str, **settings: Any) -> Iterator[str]:
        """The answer's text as it is generated; stopping early drops the turn."""
        tokens = self.tokens(question, **settings)
        try:
            yield from output.texts(tokens, self.model.tokenizer)
        finally:
            tokens.close()

    def tokens(self, question: str, **settings: Any) -> Iterator[int]:
        """The answer's token ids as they are generated. The question and its fit in the context are checked
        before the first is asked for; closing the iterator early drops the turn (the cache is cut back)."""
        from videoqa.questions import check_question

        if "frames" in settings:
            raise VideoQAError("frames: a conversation's media is read already; frames apply to the next one")
        chosen = self.settings.changed(**{k: v for k, v in settings.items() if v is not None})
        question = check_question(question)
        ids = self.next_ids(question)
        self.model.check_fits(len(ids), follow_up=bool(self.ids))
        preset = self.model.preset
        prompt = preset.followup.format(question=question) if self.ids else preset.template.format(
            media=self.placeholder, question=question)
        turn = Answer(video=self.media.path, question=question, prompt=prompt, text="", tokens=[],
                      frames=self.media.frames.listed() if self.media.frames else [], model=self.model.name,
                      runtime=self.model.runtime)
        return self._answer(turn, ids, min(chosen.max_new_tokens, self.model.context - len(ids)), chosen)

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

    def _answer(self, turn: Answer, ids: list[int], budget: int, settings: Settings) -> Iterator[int]:
        from videoqa.decode import truncate

        cache = self._cache_for(len(ids) + budget)
        cached = int(cache.get_seq_length())
        timings = {**self.pending, "prefill": 0.0, "decode": 0.0, "decode_tokens_per_s": 0.0,
                   "prefill_tokens": len(ids) - cached}
        start = first = time.perf_counter()
        answer: list[int] = []
        try:
            for tokens in self.model.generate([ids[cached:]], self.features, self.placeholder, cache, budget, settings):
                if not answer:
                    first = time.perf_counter()
                    timings["prefill"] = first - start
                answer.append(int(tokens[0]))
                yield answer[-1]
        except BaseException as e:  # Ctrl-C, an abandoned answer or no memory: the turn is dropped, the cache cut back
            truncate(cache, cached)
            if memory.is_oom(e):
                raise memory.OutOfMemory(f"out of memory during {'decode' if answer else 'prefill'}: {ADVICE}") from None
            raise
        if len(answer) > 1:
            timings["decode"] = time.perf_counter() - first
            timings["decode_tokens_per_s"] = (len(answer) - 1) / timings["decode"]
        self.ids, self.pending = ids + answer, {"load": 0.0, "frames": 0.0, "vision": 0.0}
        turn.tokens, turn.text, turn.timings = answer, self.model.decode(answer), timings
        self.answers.append(turn)
