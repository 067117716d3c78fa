"""Stage 4: the prompt as token ids, and the splice of visual features into its embeddings.

The text is rendered from the preset's template with each medium's placeholder counted
once (`USER: <video>\\n{question} ASSISTANT:`; `USER: <image>\\n<video>\\n...` for two), tokenised after a
BOS, and each placeholder id is then replaced by its medium's expansion (repeated once per feature row, timestamps
between frames for some), as transformers' processor expands it before tokenising. The splice writes the media's
rows over the placeholders of both kinds, in prompt order.
"""

from __future__ import annotations

import torch


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# a medium's expansion: that many copies of its placeholder, the family's ids for it (with timestamps between
# frames for some), or text written in the template in its place and tokenised with the rest, as the processor does
# where text ends the media and the question's first characters could merge with it (SmolVLM's)
Expansion = int | list[int] | str


def prompt_ids(tokenizer, template: str, question: str, media: list[tuple[str, Expansion]], text: str) -> list[int]:
    """A first turn's ids: BOS (if the tokenizer has one), then `turn_ids`."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [*bos, *turn_ids(tokenizer, template, question, media, text)]


def turn_ids(tokenizer, template: str, question: str, media: list[tuple[str, Expansion]], text: str) -> list[int]:
    """One turn's ids (no BOS): `template` rendered with `question` and `text` in place of its media, where each
    medium stands as its placeholder token (or, for a text expansion, as that text); each placeholder, in order, is
    then replaced by its medium's expansion. `media`: (placeholder, expansion) per medium, in prompt order."""
    ids = text_ids(tokenizer, template.format(media=text, question=question))
    placed = [(tokenizer.convert_tokens_to_ids(token), e) for token, e in media if not isinstance(e, str)]
    out, at = [], 0
    for media_id, expansion in placed:
        found = ids.index(media_id, at)
        out += ids[at:found] + ([media_id] * expansion if isinstance(expansion, int) else expansion)
        at = found + 1
    return out + ids[at:]


def splice(embed: torch.nn.Module, ids: torch.Tensor, features: torch.Tensor, media_ids: tuple[int, ...], *,
           past: int = 0) -> torch.Tensor:
    """Embeddings of the tokens after the `past` ones a cache holds, with the feature rows written, in order, over
    the positions of the `media_ids` placeholders: `features` are those of every placeholder in the whole rows
    `ids`, the rows of those before `past` skipped (a later turn brings its own media, or none)."""
    mask = torch.isin(ids, torch.tensor(media_ids, device=ids.device))
    embeds = embed(ids[:, past:])  # (B, L - past, D)
    skip = int(mask[:, :past].sum())
    return embeds.masked_scatter(mask[:, past:].unsqueeze(-1), features[skip:].to(embeds.dtype))


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L) ids with shorter rows padded on the left, and the (B, L) mask of real tokens (None: none padded)."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    if all(len(r) == width for r in rows):
        return ids, None
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
