"""Stage 4: the prompt as token ids, and the splice of visual features into its embeddings.

The text is rendered from the preset's template with the placeholder counted
once (`USER: <video>\\n{question} ASSISTANT:`), tokenised after a BOS, and the
placeholder id is then replaced by the family's expansion (repeated once per
feature row, timestamps between frames for some), as transformers' processor
expands it before tokenising.
"""

from __future__ import annotations

import torch


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def prompt_ids(tokenizer, template: str, question: str, media: str, expansion: int | list[int] | str) -> list[int]:
    """BOS (if the tokenizer has one) + the rendered template, its single `media` token replaced by `expansion`:
    that many copies of it, or the family's ids for the media (with timestamps between frames for some); or
    `expansion` text written in the template in its place and tokenised with the rest, as the processor does
    where text ends the media and the question's first characters could merge with it (SmolVLM's)."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    if isinstance(expansion, str):
        return [*bos, *text_ids(tokenizer, template.format(media=expansion, question=question))]
    media_id = tokenizer.convert_tokens_to_ids(media)
    ids = [*bos, *text_ids(tokenizer, template.format(media=media, question=question))]
    at = ids.index(media_id)
    expansion = [media_id] * expansion if isinstance(expansion, int) else expansion
    return ids[:at] + expansion + ids[at + 1 :]


def splice(embed: torch.nn.Module, ids: torch.Tensor, features: torch.Tensor, media_id: int) -> torch.Tensor:
    """Token embeddings with the feature rows written, in order, over the `media_id` positions."""
    embeds = embed(ids)  # (B, L, D)
    mask = (ids == media_id).unsqueeze(-1)  # (B, L, 1)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L) ids with shorter rows padded on the left, and the (B, L) mask of real tokens (None: none padded)."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    if all(len(r) == width for r in rows):
        return ids, None
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
