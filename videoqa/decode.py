"""Stage 5: prefill and token-by-token decoding of the Llama language model with a KV cache.

Prefill runs the spliced prompt embeddings once; each decode step feeds one
token and reuses the cache. Greedy by default; sampling applies temperature,
then top-k, then top-p, in the order of transformers' logits warpers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    seed: int | None = None


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    logits = logits / temperature  # (B, V)
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


def make_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


@torch.inference_mode()
def generate(
    net, embeds: torch.Tensor, cache, max_new_tokens: int, eos_id: int, sampling: Sampling,
    mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the (B,) next token ids, step by step, until every row has produced EOS or `max_new_tokens`.

    `cache` holds everything before `embeds`. Rows that are done keep getting tokens: the caller drops them.
    """
    if max_new_tokens == 0:
        return
    generator = make_generator(sampling, embeds.device)
    embed = net.get_input_embeddings()
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    logits = forward(net, embeds, cache, mask)  # prefill
    for step in range(max_new_tokens):
        token = next_token(logits, sampling, generator)  # (B,)
        yield token
        done |= token == eos_id
        if step == max_new_tokens - 1 or bool(done.all()):
            return
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        logits = forward(net, embed(token[:, None]), cache, mask)  # one decode step
