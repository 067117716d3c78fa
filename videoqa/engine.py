"""A loaded model's one decode path, shared by the API (session.py) and the batches (batch.py): a prompt's ids
with the visual features spliced over its placeholder, the answer's room in the context, prefill and decoding on
the static KV cache, and the answer's text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

from videoqa.errors import Exit, VideoQAError
from videoqa.settings import Settings

log = logging.getLogger("videoqa")


class Engine:
    """The net, its tokenizer and family, and what a prompt and an answer need of them."""

    def __init__(self, checkpoint, net, tokenizer, *, compile: bool, seconds: float):
        self.checkpoint, self.net, self.tokenizer, self.compiled = checkpoint, net, tokenizer, compile
        self.name, self.family, self.preset = checkpoint.name, checkpoint.family, checkpoint.preset
        self.lm = self.family.language_model(net)
        self.pending = {"load": seconds}  # reported with the first answer
        self.noted_budget = False  # the note that the context cut --max-new-tokens is said once
        self.runtime = {"device": str(net.device), "dtype": str(checkpoint.dtype).removeprefix("torch."),
                        "quantize": checkpoint.quantize}

    @property
    def context(self) -> int:
        return self.checkpoint.context

    def budget(self, wanted: int, prompt: int) -> tuple[int, list[str]]:
        """The tokens an answer after a `prompt`-token prompt may take: `wanted` (--max-new-tokens), or what the
        context leaves, with a warning that says so (also a note, once per model)."""
        budget = min(wanted, self.context - prompt)
        if budget == wanted:
            return budget, []
        warning = (f"--max-new-tokens {wanted}: the model's context of {self.context} positions leaves {budget} after "
                   f"the prompt's {prompt}, so the answer is at most {budget} tokens")
        if not self.noted_budget:
            self.noted_budget = True
            log.warning(warning)
        return budget, [warning]

    def check_fits(self, needed: int, follow_up: bool = False) -> None:
        """Refuse a prompt that leaves no room in the model's context for even one answer token."""
        if needed >= self.context:
            what = "conversation too long: it" if follow_up else "question too long: the prompt"
            hint = "; /reset to start over" if follow_up else ""
            raise VideoQAError(f"{what} needs {needed} tokens and the model's context holds {self.context}{hint}")

    def generate(self, rows: list[list[int]], visuals: list, cache, budget: int, settings: Settings,
                 wanted=None) -> Iterator:
        """The one decode path: rows of ids (left-padded into `cache` when their lengths differ; or a conversation
        whose start `cache` holds) with the rows' `visuals` (features.Visual, in prompt order, row after row)
        spliced over their placeholders, what the cache lacks prefilled, then decoded token by token (a
        decode.Step per token: the (B,) ids and what `wanted`, a decode.Wanted, asks for)."""
        from videoqa.decode import NOTHING, compiled_step, decode_step, generate

        embeds, padding, positions = self.embedded(rows, visuals, past=int(cache.get_seq_length()))
        step = compiled_step() if self.compiled else decode_step
        return generate(self.lm, embeds, cache, budget, self.tokenizer.eos_token_id, settings.sampling, positions,
                        padding, step, wanted or NOTHING)

    def next_logits(self, rows: list[list[int]], visuals: list):
        """(B, V) float32 logits of the token after each row, the rows made as for `generate`: one prefill, no
        decoding."""
        from videoqa.decode import prefill, static_cache

        embeds, padding, positions = self.embedded(rows, visuals, past=0)
        return prefill(self.lm, embeds, static_cache(self.net.config.text_config, embeds.shape[1]), positions,
                       padding)

    def embedded(self, rows: list[list[int]], visuals: list, *, past: int):
        """(B, L - past, D) embeddings of the rows' tokens after the `past` ones the cache holds, left-padded, with
        the rows of their `visuals` over their placeholders (those of media the cache holds already left out: a
        follow-up turn has none, or its own); the (B, L) mask of real tokens (None: no row is padded); and the
        family's positions (and extra inputs) for them."""
        import torch

        from videoqa.prompt import left_pad, splice

        ids, padding = left_pad(rows, self.pad_id, self.net.device)
        placed = torch.cat([v.rows for v in visuals])
        media_ids = tuple({self.tokenizer.convert_tokens_to_ids(self.placeholder(v)) for v in visuals})
        embeds = splice(self.lm.embed, ids, placed, media_ids, past=past)
        return embeds, padding, self.family.positions(self.net, ids, padding, past, visuals)

    def placeholder(self, visual) -> str:
        """The token a video's or an image's features stand in for in the prompt (a video's have frame times)."""
        return self.family.video_token if visual.times else self.family.image_token

    def in_order(self, media: list[tuple]) -> list[tuple]:
        """A turn's (file, features.Visual) pairs in the order its prompt places them: the family's images before
        its videos, or as given."""
        return sorted(media, key=lambda pair: bool(pair[1].times)) if self.family.images_first else list(media)

    def turn_ids(self, template: str, question: str, visuals: list, *, first: bool = True) -> list[int]:
        """One turn's ids about `visuals` (in prompt order, see `in_order`; none for a follow-up without media):
        `template` rendered with the question and the media as the family writes them (`media_text`), each
        placeholder expanded (`expand`); after BOS when it is the `first`."""
        from videoqa.prompt import prompt_ids, turn_ids

        family, tokenizer = self.family, self.tokenizer
        media = [(self.placeholder(v), family.expand(tokenizer, self.placeholder(v), v)) for v in visuals]
        text = self.media_text([(bool(v.times), e if isinstance(e, str) else p) for v, (p, e) in zip(visuals, media)])
        return (prompt_ids if first else turn_ids)(tokenizer, template, question, media, text)

    def turn_text(self, template: str, question: str, visuals: list) -> str:
        """That turn's text with each medium's placeholder once (what an Answer's `prompt` shows)."""
        media = self.media_text([(bool(v.times), self.placeholder(v)) for v in visuals])
        return template.format(media=media, question=question)

    def media_text(self, media: list[tuple[bool, str]]) -> str:
        """What stands for a turn's media in its template: the family's `media_text`; nothing in a turn without."""
        return self.family.media_text(media) if media else ""

    def video_features(self, pixels, times):
        """A video's features (a features.Visual) from its preprocessed frames: the one path from pixels to
        features, for a question (session.py, with the feature cache) and for a batch's rows (batch.py)."""
        from videoqa.features import visual

        return visual(self.family.video.features(self.net, pixels), times)

    def option_ids(self, prompt: str, option: str) -> list[int]:
        """The tokens `option` is as an answer after the rendered `prompt`: the ids of prompt + option past the
        prompt's own (with a space between after a prompt that ends in a word, none after white space)."""
        from videoqa.prompt import text_ids

        base = text_ids(self.tokenizer, prompt)
        ids = text_ids(self.tokenizer, prompt + ("" if prompt[-1].isspace() else " ") + option)
        same = next((i for i, (a, b) in enumerate(zip(ids, base)) if a != b), len(base))
        if same >= len(ids):
            raise VideoQAError(f"--choices {option!r}: an option that adds no token to the prompt")
        return ids[same:]

    def option_tokens(self, prompt: str, choices) -> tuple[list[str], list[list[int]]]:
        """The options as given (two or more, different, non-empty) and each one's tokens after `prompt`."""
        options = [str(option).strip() for option in choices]
        if len(options) < 2 or not all(options) or len(set(options)) < len(options):
            raise VideoQAError("--choices: give two or more different, non-empty options, e.g. \"tennis|golf\"")
        return options, [self.option_ids(prompt, option) for option in options]

    def choose(self, ids: list[int], visuals: list, prompt: str, choices, cache_for, *,
               follow_up: bool = False) -> tuple[list[dict], dict]:
        """Multiple choice after the prompt `ids` (rendered as `prompt`): each option's {"text", "logprob" (summed
        over its tokens), "mean_logprob", "tokens"}, and the likeliest of them. The prompt is prefilled once into
        `cache_for(length)`, a static cache able to hold it and the longest option (see `score`)."""
        options, tokens = self.option_tokens(prompt, choices)
        needed = len(ids) + max(map(len, tokens))
        self.check_fits(needed, follow_up=follow_up)
        sums = self.score(ids, visuals, cache_for(needed), tokens)
        scored = [{"text": o, "logprob": s, "mean_logprob": s / len(t), "tokens": t}
                  for o, s, t in zip(options, sums, tokens)]
        return scored, max(scored, key=lambda option: option["logprob"])

    def score(self, ids: list[int], visuals: list, cache, options: list[list[int]]) -> list[float]:
        """Each option's summed log-probability after the prompt `ids` (the cache holds a prefix of them): the
        prompt prefilled once, each option's tokens then run after it and cut back off the cache."""
        import torch

        from videoqa.decode import logprobs, prefill, truncate

        past = int(cache.get_seq_length())
        embeds, _, positions = self.embedded([ids], visuals, past=past)
        first = prefill(self.lm, embeds, cache, positions).log_softmax(-1)[0]  # (V,) after the prompt
        sums = []
        for option in options:
            total = float(first[option[0]])
            if len(option) > 1:
                rows = [ids + option[:-1]]
                after, _, at = self.embedded(rows, visuals, past=len(ids))
                chunk = logprobs(self.lm, after, cache, at)[0]  # (len(option) - 1, V)
                total += float(chunk.gather(-1, torch.tensor(option[1:], device=chunk.device)[:, None]).sum())
                truncate(cache, len(ids))
            sums.append(total)
        return sums

    @functools.cached_property
    def answer_ids(self) -> tuple[int, int]:
        """The ids of "Yes" and "No" as the first token of an answer after the template: " Yes" after a template
        that ends in a word or punctuation (`ASSISTANT:`), "Yes" after one that ends in white space (ChatML's
        newline); read off the tokenizer, which encodes the answer after the template (`option_ids`)."""
        prompt = self.preset.template.format(media=self.family.video_token, question="?")
        yes, no = (self.option_ids(prompt, word)[0] for word in ("Yes", "No"))
        if yes == no:  # both would score 0.5, whatever the video shows
            raise VideoQAError(f'find: the tokenizer begins both "Yes" and "No" with '
                               f'{self.tokenizer.convert_ids_to_tokens(yes)!r} after the prompt, so their scores '
                               "cannot be told apart", Exit.MODEL)
        return yes, no

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def decode(self, tokens: list[int], stop: tuple[str, ...] = ()) -> str:
        """The answer's text, up to the first of the `stop` strings if it holds one."""
        from videoqa.output import stop_index

        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        at = stop_index(text, stop)
        return (text if at is None else text[:at]).strip()

    def stopped(self, tokens: list[int], stop: tuple[str, ...]) -> bool:
        """Whether the answer so far holds one of the `stop` strings (decoded whole: one may span tokens)."""
        from videoqa.output import stop_index

        return bool(stop) and stop_index(self.tokenizer.decode(tokens, skip_special_tokens=True), stop) is not None
