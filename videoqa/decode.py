"""Stage 5: prefill and token-by-token decoding of the language model over a static, preallocated KV cache.

Prefill runs the spliced prompt embeddings once; each decode step feeds one token and reuses the cache (the
step is compiled with CUDA graphs on CUDA). A batch's rows are left-padded into one cache, each stopping at its
EOS. Greedy by default; sampling applies temperature, then top-k, then top-p, in the order of transformers'
logits warpers.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch

from videoqa.settings import Sampling


def warped(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The logits sampled from: over the temperature, the tokens outside top-k and top-p at -inf."""
    # Shifted so the largest is 0 before dividing: no temperature, however small, overflows to inf - inf = NaN;
    # as it goes to 0 the distribution goes to the argmax (ties shared), as it should. A temperature below the
    # dtype's smallest normal number would round to 0 (0 / 0): at that one every other logit is -inf already.
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # (B, V)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    return warped(logits, temperature, top_k, top_p).softmax(-1)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(B, V) log-probabilities of the distribution the next token is drawn from: the model's own under greedy
    decoding, after temperature, top-k and top-p when sampling (-inf for the tokens they leave out)."""
    if sampling.temperature == 0:
        return logits.log_softmax(-1)
    return warped(logits, sampling.temperature, sampling.top_k, sampling.top_p).log_softmax(-1)


class LanguageModel(NamedTuple):
    """The parts of a checkpoint that decode: token embeddings, the transformer body, the LM head."""

    embed: torch.nn.Module
    body: torch.nn.Module
    head: torch.nn.Module


class Wanted(NamedTuple):
    """What each decode step carries besides its token: the distribution it was drawn from (`scores`), the hidden
    states of the layers asked for (True: all, embeddings first, as transformers counts them), the attention
    weights (they need eager attention)."""

    scores: bool = False
    hidden_states: bool | tuple[int, ...] = False
    attentions: bool = False


NOTHING = Wanted()


class Out(NamedTuple):
    """One forward's output at the last position: (B, V) float32 logits, and what `Wanted` asked for."""

    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None  # (B, layers, D)
    attentions: torch.Tensor | None = None  # (B, layers, heads, K) over the K positions the cache holds now


class Step(NamedTuple):
    """What the decode loop yields per token: the (B,) ids and what `Wanted` asked for of the forward that chose
    them (`scores`: (B, V) log-probabilities of the distribution they were drawn from)."""

    token: torch.Tensor
    scores: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    attentions: torch.Tensor | None = None


def forward(lm: LanguageModel, embeds: torch.Tensor, cache, mask=None, positions=None, extras=None,
            wanted: Wanted = NOTHING) -> Out:
    """(B, T, D) new embeddings -> the last position's output; extends the cache.

    `mask` (B, cache capacity) is 0 at left padding (None: no row is padded); `positions` and `extras` (more keyword
    inputs of the body, at a prefill) are the family's.
    """
    asked = {"output_hidden_states": True} if wanted.hidden_states else {}
    asked.update({"output_attentions": True} if wanted.attentions else {})
    out = lm.body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                  **asked, **(extras or {}))
    logits = lm.head(out.last_hidden_state[:, -1]).float()
    if not asked:
        return Out(logits)
    hidden = attentions = None
    if wanted.hidden_states:
        layers = out.hidden_states if wanted.hidden_states is True else [out.hidden_states[i]
                                                                           for i in wanted.hidden_states]
        hidden = torch.stack([layer[:, -1] for layer in layers], 1)
    if wanted.attentions:
        held = int(cache.get_seq_length())  # a static cache's weights past it are 0
        attentions = torch.stack([layer[:, :, -1, :held] for layer in out.attentions], 1)
    return Out(logits, hidden, attentions)


@torch.inference_mode()
def logprobs(lm: LanguageModel, embeds: torch.Tensor, cache, positions: Positions) -> torch.Tensor:
    """(B, T, V) float32 log-probabilities after each of `embeds`' T positions, run into `cache` after what it holds
    (teacher forcing: a multiple-choice option's tokens after its prompt)."""
    out = lm.body(inputs_embeds=embeds, position_ids=positions.prompt, cache=cache, use_cache=True,
                  **(positions.extras or {}))
    return lm.head(out.last_hidden_state).float().log_softmax(-1)


def decode_step(lm: LanguageModel, token: torch.Tensor, cache, mask=None, positions=None) -> torch.Tensor:
    """(B, 1) last tokens -> (B, V) logits: the unit that is compiled (every shape in it is fixed)."""
    return forward(lm, lm.embed(token), cache, mask, positions).logits


_ONEDNN_LOCK = threading.Lock()
_STEPS_OFF_ONEDNN = 0  # one-row bfloat16 steps running now, in any thread
_ONEDNN_BEFORE = True


@contextlib.contextmanager
def step_kernels(token: torch.Tensor, dtype: torch.dtype) -> Iterator[None]:
    """Around one decode step: torch's own matrix-vector kernel, not oneDNN's, for one bfloat16 row on a CPU.
    Measured here (benchmarks/README.md, "CPU speed"): oneDNN's reads about 20 GB/s of weights for one row where
    torch's own reads 33 (Qwen2-0.5B's 4864 x 896 layers and its 151,936-row head alike); at two rows and more (a
    prefill, a batch) oneDNN is the faster (56 against 37 GFLOP/s at two rows, 571 against 34 at 411), and float32
    is the same either way."""
    if token.device.type != "cpu" or dtype != torch.bfloat16 or token.shape[0] != 1:
        yield
        return
    global _STEPS_OFF_ONEDNN, _ONEDNN_BEFORE
    with _ONEDNN_LOCK:  # the flag is the process's: the last step of those running at once puts it back
        if _STEPS_OFF_ONEDNN == 0:
            _ONEDNN_BEFORE = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _STEPS_OFF_ONEDNN += 1
    try:
        yield
    finally:
        with _ONEDNN_LOCK:
            _STEPS_OFF_ONEDNN -= 1
            if _STEPS_OFF_ONEDNN == 0:
                torch.backends.mkldnn.enabled = _ONEDNN_BEFORE


@functools.cache
def compiled_step():
    """The decode step compiled once per process (CUDA graphs with reduce-overhead) and reused by every call:
    static cache sizes come in buckets, so a new question usually finds its graph ready."""
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)


BUCKET = 256  # static caches are sized in multiples of this, to bound the number of compiled graphs


def static_cache(text_config, length: int):
    """A preallocated KV cache for `length` tokens (per row), rounded up to a bucket."""
    from transformers import StaticCache

    return StaticCache(config=text_config, max_cache_len=-(-length // BUCKET) * BUCKET)


def grown(text_config, cache, length: int):
    """A static cache for `length` tokens holding what `cache` holds: a conversation moves up a bucket
    without being prefilled again."""
    held = int(cache.get_seq_length())
    return row_cache(text_config, cache, length, row=slice(None), start=0, end=held)


def row_cache(text_config, cache, length: int, *, row: int | slice, start: int, end: int):
    """A static cache for `length` tokens holding positions [start, end) of `cache`'s `row` (an int: one row of a
    batch's, its left padding before `start` dropped) at its start: a conversation answered in a batch goes on
    alone, as if answered alone (the positions the rotary embedding gave each token counted from its row's first
    real one)."""
    rows = slice(row, row + 1) if isinstance(row, int) else row
    new_cache = static_cache(text_config, length)
    for old, new in zip(cache.layers, new_cache.layers):
        if old.is_initialized:
            new.lazy_initialization(old.keys[rows], old.values[rows])
            new.keys[:, :, : end - start] = old.keys[rows, :, start:end]
            new.values[:, :, : end - start] = old.values[rows, :, start:end]
            new.cumulative_length.fill_(end - start)
    return new_cache


def capacity(cache) -> int:
    """Tokens a static cache can hold."""
    return cache.layers[0].max_cache_len


def make_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def truncate(cache, length: int) -> None:
    """Cut every layer back to `length` tokens; an interrupted forward may have extended only some of them."""
    for layer in cache.layers:
        held = int(layer.get_seq_length())
        if held > length:
            layer.crop(length - held)


class Positions(NamedTuple):
    """Where tokens sit for the rotary embedding, as the family computes them (this loop computes none): `prompt`
    for the tokens prefilled, (B, T) (or (3, B, T) under M-RoPE), and `next` for the first answer token, (B, 1)
    (or (3, B, 1)); each later answer token sits one further along every axis. `extras`: what else the body takes
    with the prefill (DeepStack's visual rows per layer and their mask), None for nothing."""

    prompt: torch.Tensor
    next: torch.Tensor
    extras: dict | None = None


def attention_mask(padding: torch.Tensor | None, cache) -> torch.Tensor | None:
    """For left-padded rows (`padding` (B, T): 1 at real tokens) entering an empty cache: the (B, capacity) mask,
    fixed for the whole answer; None when no row is padded."""
    if padding is None:
        return None
    mask = padding.new_ones(padding.shape[0], capacity(cache))
    mask[:, : padding.shape[1]] = padding
    return mask


@torch.inference_mode()
def prefill(lm: LanguageModel, embeds: torch.Tensor, cache, positions: Positions,
            padding: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) float32 logits of the token after each row: the prompt run once into the empty `cache`, left padding
    (`padding`) masked as `generate` masks it."""
    return forward(lm, embeds, cache, attention_mask(padding, cache), positions.prompt, positions.extras).logits


@torch.inference_mode()
def generate(
    lm: LanguageModel, embeds: torch.Tensor, cache, max_new_tokens: int, eos_id: int, sampling: Sampling,
    positions: Positions, padding: torch.Tensor | None = None, step=decode_step, wanted: Wanted = NOTHING,
) -> Iterator[Step]:
    """Yield a `Step` per new token (its (B,) ids, and what `wanted` asks for), until every row has produced EOS
    or `max_new_tokens`.

    One path for a question, a conversation's next turn and a batch of videos. `cache` (static) holds everything
    before `embeds`; `positions` are the family's; `padding` marks left padding of a batch's rows (None when no row
    is padded). Rows that are done keep getting tokens: the caller drops them. Prefill runs eagerly; `step` (eager
    or compiled) runs each new token, or the eager forward where hidden states or attentions are wanted.
    """
    if max_new_tokens == 0:
        return
    generator = make_generator(sampling, embeds.device)
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    mask = attention_mask(padding, cache)
    out = forward(lm, embeds, cache, mask, positions.prompt, positions.extras, wanted)  # prefill
    after, observed = positions.next, bool(wanted.hidden_states or wanted.attentions)
    for produced in range(1, max_new_tokens + 1):
        token = next_token(out.logits, sampling, generator)  # (B,)
        yield Step(token, distribution(out.logits, sampling) if wanted.scores else None, *out[1:])
        done |= token == eos_id
        if produced == max_new_tokens or bool(done.all()):
            return
        with step_kernels(token, embeds.dtype):  # one decode step
            out = (forward(lm, lm.embed(token[:, None]), cache, mask, after, None, wanted) if observed else
                   Out(step(lm, token[:, None], cache, mask, after)))
        after = after + 1
