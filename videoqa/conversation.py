"""The pipeline for one video or image: pixels -> features once, then questions answered over one KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from videoqa.cache import FeatureCache
from videoqa.decode import Sampling, capacity, compiled_step, decode_step, generate, grown, static_cache
from videoqa.errors import VideoQAError
from videoqa.features import image_features, video_features
from videoqa.frames import Frames, check_file, is_image, read_media
from videoqa.models import Model, check_video
from videoqa.pixels import clip_pixels
from videoqa.prompt import prompt_ids, splice, text_ids


@dataclass
class Settings:
    """What a question is answered with: frames sampled, answer length, sampling."""

    frames: int
    max_new_tokens: int
    sampling: Sampling
    compile: bool = False  # the compiled decode step (CUDA); the KV cache is static either way


def read(path: Path, frames: int, cache: FeatureCache | None) -> tuple[Frames | Image.Image, torch.Tensor | None]:
    """The media and, for a video the cache knows, its features (then no frame is decoded)."""
    if cache is not None and not is_image(path):
        check_file(path)
        hit = cache.get(path, frames)
        if hit is not None:
            return hit
    return read_media(path, frames), None


def remember(cache: FeatureCache | None, path: Path, convo: Conversation) -> str | None:
    """Keep a video's newly computed features for the next process that asks about it; why not, if it failed.

    A pipe (chat's VIDEO, read through a temporary copy) is not kept: its content, the key, cannot be read again.
    """
    if cache is not None and isinstance(convo.media, Frames) and convo.media.pixels is not None and path.is_file():
        return cache.put(path, convo.media, convo.features)
    return None


def check_fits(model: Model, needed: int, follow_up: bool = False) -> None:
    """Refuse a prompt that leaves no room in the model's context for even one answer token."""
    if needed >= model.context:
        what = "conversation too long: it" if follow_up else "question too long: the prompt"
        hint = "; /reset to start over" if follow_up else ""
        raise VideoQAError(f"{what} needs {needed} tokens and the model's context holds {model.context}{hint}")


class Conversation:
    """One video or image: its projected features (computed once), and the ids and KV cache of what was said."""

    def __init__(
        self, model: Model, media: Frames | Image.Image, features: torch.Tensor | None = None, compile: bool = False
    ):
        self.model, self.media, self.compiled = model, media, compile
        net = model.net
        start = time.perf_counter()
        if isinstance(media, Frames):
            check_video(net.config.model_type, model.name)
            self.placeholder = "<video>"
            if features is not None:  # from the feature cache
                self.features = features.to(net.device, net.dtype)
            else:
                self.features = video_features(net, clip_pixels(media.pixels, net.config.vision_config.image_size))
        else:
            self.placeholder = "<image>"
            self.features = image_features(net, media)
        if net.device.type == "cuda":
            torch.cuda.synchronize()
        self.timings: dict[str, float] = {"vision": time.perf_counter() - start}
        self.reset()

    def reset(self) -> None:
        """Forget what was said; keep the media's features."""
        self.ids: list[int] = []  # the whole conversation: prompts and answers
        self.cache = None  # holds a prefix of self.ids

    def _cache_for(self, length: int):
        """The static KV cache, able to hold `length` tokens: preallocated, then moved up a bucket when outgrown.
        (Static also when eager: in place updates beat a dynamic cache's growing copies once the prompt is long.)"""
        if self.cache is None:
            self.cache = static_cache(self.model.net, length)
        elif capacity(self.cache) < length:
            self.cache = grown(self.model.net, self.cache, length)
        return self.cache

    def next_ids(self, question: str) -> list[int]:
        """The conversation so far plus the new question, in the llava_v1 multi-turn format."""
        tokenizer, preset = self.model.tokenizer, self.model.preset
        if not self.ids:
            return prompt_ids(tokenizer, preset.template, question, self.placeholder, self.features.shape[0])
        eos = [tokenizer.eos_token_id] if self.ids[-1] != tokenizer.eos_token_id else []
        return [*self.ids, *eos, *text_ids(tokenizer, preset.followup.format(question=question))]

    def ask(self, question: str, max_new_tokens: int, sampling: Sampling) -> Iterator[int]:
        """Check that the turn fits the context now; the returned iterator streams the answer's token ids."""
        ids = self.next_ids(question)
        preset = self.model.preset
        first = preset.template.format(media=self.placeholder, question=question)
        self.prompt = preset.followup.format(question=question) if self.ids else first
        check_fits(self.model, len(ids), follow_up=bool(self.ids))
        return self._answer(ids, min(max_new_tokens, self.model.context - len(ids)), sampling)

    def _answer(self, ids: list[int], max_new_tokens: int, sampling: Sampling) -> Iterator[int]:
        net, tokenizer = self.model.net, self.model.tokenizer
        cache = self._cache_for(len(ids) + max_new_tokens)
        cached = int(cache.get_seq_length())
        new = torch.tensor([ids[cached:]], device=net.device)  # only what the cache does not hold yet
        media_id = tokenizer.convert_tokens_to_ids(self.placeholder)
        self.timings.update(prefill=0.0, decode=0.0, decode_tokens_per_s=0.0, prefill_tokens=new.shape[1])
        start = first = time.perf_counter()
        answer: list[int] = []
        try:
            with torch.inference_mode():
                embeds = splice(net.get_input_embeddings(), new, self.features, media_id)
            step = compiled_step() if self.compiled else decode_step
            for tokens in generate(net, embeds, cache, max_new_tokens, tokenizer.eos_token_id, sampling, step=step):
                token = int(tokens[0])
                if not answer:
                    first = time.perf_counter()
                    self.timings["prefill"] = first - start
                answer.append(token)
                yield token
        except BaseException:  # Ctrl-C or an abandoned answer: the turn is dropped, the cache cut back to before it
            truncate(cache, cached)
            raise
        if len(answer) > 1:
            self.timings["decode"] = time.perf_counter() - first
            self.timings["decode_tokens_per_s"] = (len(answer) - 1) / self.timings["decode"]
        self.ids = ids + answer


def truncate(cache, length: int) -> None:
    """Cut every layer back to `length` tokens; an interrupted forward may have extended only some of them."""
    for layer in cache.layers:
        held = int(layer.get_seq_length())
        if held > length:
            layer.crop(length - held)


def answer_batch(model: Model, videos: list[Frames], questions: list[str], settings: Settings):
    """Several videos prefilled and decoded together (left padding, per-row EOS); greedy answers equal `ask`'s.

    Returns each row's tokens, up to and including its EOS, and the batch's timings.
    """
    net, tokenizer, preset = model.net, model.tokenizer, model.preset
    start = time.perf_counter()
    pixels = np.concatenate([clip_pixels(v.pixels, net.config.vision_config.image_size) for v in videos])
    features = video_features(net, pixels)  # (all frames * T, D), video after video
    per_frame = features.shape[0] // pixels.shape[0]
    rows = [
        prompt_ids(tokenizer, preset.template, q, "<video>", len(v.indices) * per_frame)
        for v, q in zip(videos, questions)
    ]
    width = max(map(len, rows))
    check_fits(model, width)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=net.device)  # (B, L), left-padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=net.device)
    from transformers import DynamicCache

    cache = DynamicCache(config=net.config.text_config)
    with torch.inference_mode():
        embeds = splice(net.get_input_embeddings(), ids, features, tokenizer.convert_tokens_to_ids("<video>"))
    vision = time.perf_counter() - start
    answers: list[list[int]] = [[] for _ in rows]
    eos, budget = tokenizer.eos_token_id, min(settings.max_new_tokens, model.context - width)
    for i, step in enumerate(generate(net, embeds, cache, budget, eos, settings.sampling, mask)):
        if i == 0:
            prefill = time.perf_counter() - start - vision
        for answer, token in zip(answers, step.tolist()):
            if not answer or answer[-1] != eos:
                answer.append(token)
    timings = {"vision": vision, "prefill": prefill if budget else 0.0}
    timings["decode"] = time.perf_counter() - start - vision - timings["prefill"]
    return answers, timings


def record(
    model: Model, video: Path, question: str, prompt: str, frames: Frames | None, tokens: list[int],
    timings: dict[str, float], error: str | None = None,
) -> dict:
    """The one schema of `ask --json`, chat turns and caption records (documented in the README)."""
    return {
        "video": str(video),
        "question": question,
        "prompt": prompt,
        "answer": model.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
        "tokens": tokens,
        "frames": [{"index": i, "time": t} for i, t in zip(frames.indices, frames.times)] if frames else [],
        "model": model.name,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "error": error,
    }
