"""The pipeline for one video: frames -> pixels -> features once, then questions answered over one KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
import torch

from videoqa.decode import Sampling, generate
from videoqa.errors import Exit, VideoQAError
from videoqa.features import video_features
from videoqa.frames import Frames
from videoqa.models import Model
from videoqa.pixels import clip_pixels
from videoqa.prompt import prompt_ids, splice

VIDEO = "<video>"


class Conversation:
    """A video's projected features, and the token ids and KV cache of everything said about it."""

    def __init__(self, model: Model, frames: Frames):
        self.model, self.frames = model, frames
        net = model.net
        start = time.perf_counter()
        pixels = clip_pixels(frames.pixels, net.config.vision_config.image_size)
        self.features = video_features(net, pixels)  # (frames * 257, D)
        if net.device.type == "cuda":
            torch.cuda.synchronize()
        self.timings = {"vision": time.perf_counter() - start}
        self.ids: list[int] = []  # every token id the cache holds
        from transformers import DynamicCache

        self.cache = DynamicCache(config=net.config.text_config)

    def prompt(self, question: str) -> list[int]:
        tokenizer, preset = self.model.tokenizer, self.model.preset
        return prompt_ids(tokenizer, preset.template, question, VIDEO, self.features.shape[0])

    def ask(self, question: str, max_new_tokens: int, sampling: Sampling) -> Iterator[int]:
        """Check that the turn fits the context now; the returned iterator streams the answer's token ids."""
        new_ids = self.prompt(question)
        used = len(self.ids) + len(new_ids)
        if used >= self.model.context:
            raise VideoQAError(
                f"question too long: the prompt needs {used} tokens and the model's context holds {self.model.context}"
            )
        return self._answer(new_ids, min(max_new_tokens, self.model.context - used), sampling)

    def _answer(self, new_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Iterator[int]:
        net, tokenizer = self.model.net, self.model.tokenizer
        ids = torch.tensor([new_ids], device=net.device)
        media_id = tokenizer.convert_tokens_to_ids(VIDEO)
        start = time.perf_counter()
        with torch.inference_mode():
            embeds = splice(net.get_input_embeddings(), ids, self.features, media_id)
        answer: list[int] = []
        self.timings.update(prefill=0.0, decode=0.0, decode_tokens_per_s=0.0)
        for token in generate(net, embeds, self.cache, max_new_tokens, tokenizer.eos_token_id, sampling):
            if not answer:
                first = time.perf_counter()
                self.timings["prefill"] = first - start
            answer.append(token)
            yield token
        if len(answer) > 1:
            self.timings["decode"] = time.perf_counter() - first
            self.timings["decode_tokens_per_s"] = (len(answer) - 1) / self.timings["decode"]
        self.ids += new_ids + answer


def record(model: Model, video: Path, question: str, frames: Frames, tokens: list[int], timings: dict) -> dict:
    """The one JSON schema of `ask --json` (and of caption records)."""
    return {
        "answer": model.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
        "tokens": tokens,
        "frames": [{"index": i, "time": t} for i, t in zip(frames.indices, frames.times)],
        "model": model.name,
        "video": str(video),
        "question": question,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
