"""Stage 5: prefill and token-by-token decoding of the Llama language model with a KV cache.

Prefill runs the spliced prompt embeddings once; each decode step feeds one
token and reuses the cache. Greedy by default; sampling applies temperature,
then top-k, then top-p, in the order of transformers' logits warpers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from videoqa.settings import Sampling


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    # Shifted so the largest is 0 before dividing: no temperature, however small, overflows to inf - inf = NaN;
    # as it goes to 0 the distribution goes to the argmax (ties shared), as it should.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # (B, V)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits.softmax(-1)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def forward(net, embeds: torch.Tensor, cache, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) new embeddings -> (B, V) float32 logits of the last position; extends the cache.

    `mask` (B, cached + T) is 0 at left padding; positions then count real tokens only.
    """
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]
    out = net.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    )
    return net.lm_head(out.last_hidden_state[:, -1]).float()


def decode_step(net, token: torch.Tensor, cache, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1) last tokens -> (B, V) logits: the unit that is compiled."""
    return forward(net, net.get_input_embeddings()(token), cache, mask)


@functools.cache
def compiled_step():
    """The decode step compiled once per process (CUDA graphs with reduce-overhead) and reused by every call:
    static cache sizes come in buckets, so a new question usually finds its graph ready."""
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)


BUCKET = 256  # static caches are sized in multiples of this, to bound the number of compiled graphs


def static_cache(net, length: int):
    """A preallocated KV cache for `length` tokens, rounded up to a bucket."""
    from transformers import StaticCache

    return StaticCache(config=net.config.text_config, max_cache_len=-(-length // BUCKET) * BUCKET)


def grown(net, cache, length: int):
    """A static cache for `length` tokens holding what `cache` holds: a conversation moves up a bucket
    without being prefilled again."""
    bigger = static_cache(net, length)
    for old, new in zip(cache.layers, bigger.layers):
        if old.is_initialized:
            held = int(old.get_seq_length())
            new.lazy_initialization(old.keys, old.values)
            new.keys[:, :, :held] = old.keys[:, :, :held]
            new.values[:, :, :held] = old.values[:, :, :held]
            new.cumulative_length.fill_(held)
    return bigger


def capacity(cache) -> int:
    """Tokens a static cache can hold."""
    return cache.layers[0].max_cache_len


def make_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


@torch.inference_mode()
def generate(
    net, embeds: torch.Tensor, cache, max_new_tokens: int, eos_id: int, sampling: Sampling,
    mask: torch.Tensor | None = None, step=decode_step,
) -> Iterator[torch.Tensor]:
    """Yield the (B,) next token ids, step by step, until every row has produced EOS or `max_new_tokens`.

    `cache` holds everything before `embeds`. Rows that are done keep getting tokens: the caller drops them.
    Prefill runs eagerly; `step` (eager or compiled) runs each new token.
    """
    if max_new_tokens == 0:
        return
    generator = make_generator(sampling, embeds.device)
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    logits = forward(net, embeds, cache, mask)  # prefill
    for produced in range(1, max_new_tokens + 1):
        token = next_token(logits, sampling, generator)  # (B,)
        yield token
        done |= token == eos_id
        if produced == max_new_tokens or bool(done.all()):
            return
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        logits = step(net, token[:, None], cache, mask)  # one decode step
