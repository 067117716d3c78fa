"""What an answer's decode steps carried besides its tokens (decode.Step), made into what the records and the API
give: each token's log-probability with the N likeliest alternatives, the hidden states and attention weights asked
for, and the share of the answer's attention that fell on each sampled frame (`--explain`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from videoqa.decode import Step, Wanted
from videoqa.errors import VideoQAError


def layers_of(hidden_states: bool | Sequence[int], count: int) -> bool | tuple[int, ...]:
    """The hidden-state layers asked for, checked against the `count` transformers returns (the embeddings' output
    first, then each decoder layer's; negative indices count from the last)."""
    if isinstance(hidden_states, bool):
        return hidden_states
    chosen = tuple(hidden_states)
    wrong = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count]
    if not chosen or wrong:
        raise VideoQAError(f"hidden_states {list(chosen)!r}: True, or layer indices from {-count} to {count - 1} "
                           "(0 is the embeddings' output)")
    return chosen


@contextmanager
def eager_attention(net, body, wanted: Wanted):
    """While attention weights are wanted: the language model on eager attention (SDPA computes none), and each
    attention layer of `body` handing on the last query row of its weights alone, which is all a step's output
    keeps: a prefill would otherwise hold every layer's (heads x T x T) weights at once. Then back."""
    config = net.config.text_config
    before = config._attn_implementation
    if not wanted.attentions:
        yield
        return
    recorded = type(body)._can_record_outputs["attentions"]  # the class transformers records them from
    layer = getattr(recorded, "target_class", recorded)

    def last_row(module, args, output):
        # a copy: a view would keep the whole (heads x T x K) weights alive
        return (output[0], output[1][..., -1:, :].clone(), *output[2:]) if output[1] is not None else output

    hooks = [m.register_forward_hook(last_row, prepend=True) for m in body.modules() if isinstance(m, layer)]
    net.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        net.set_attn_implementation({"text_config": before})
        for hook in hooks:
            hook.remove()


class Trace:
    """What the steps of one decode (B rows) carried, kept as they come: per step the chosen tokens' log-probability
    and the `logprobs` likeliest tokens (on the CPU, so a long answer holds no vocabulary-sized rows), hidden states
    and attention weights if asked for, and per-frame attention shares for `spans` (--explain, one row)."""

    def __init__(self, *, logprobs: int | None = None, hidden_states: bool | tuple[int, ...] = False,
                 attentions: bool = False, spans: torch.Tensor | None = None):
        self.top, self.spans = logprobs, spans
        self.wanted = Wanted(scores=logprobs is not None, hidden_states=hidden_states,
                             attentions=attentions or spans is not None)
        self.keep_attentions = attentions
        self.scores: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.hidden: list[torch.Tensor] = []
        self.attentions: list[torch.Tensor] = []
        self.shares: list[torch.Tensor] = []

    def add(self, step: Step) -> None:
        if step.scores is not None:
            chosen = step.scores.gather(-1, step.token[:, None])[:, 0]
            top = step.scores.topk(min(self.top, step.scores.shape[-1]))
            self.scores.append((chosen.cpu(), top.values.cpu(), top.indices.cpu()))
        if step.hidden_states is not None:
            self.hidden.append(step.hidden_states.float().cpu())
        if step.attentions is not None:
            weights = step.attentions.float().cpu()
            if self.keep_attentions:
                self.attentions.append(weights)
            if self.spans is not None:
                self.shares.append(self.spans @ weights[0].mean((0, 1))[: self.spans.shape[1]])

    def logprobs(self, tokenizer, row: int, tokens: list[int], before: int) -> list[dict] | None:
        """Row `row`'s record entries, one per answer token: {"token", "text", "logprob", "top": [...]} (alternatives
        the distribution leaves out, at -inf, are not listed); `before`: the token before the answer."""
        if self.top is None:
            return None
        entries, previous = [], before
        for token, (chosen, values, ids) in zip(tokens, self.scores):
            text = functools.partial(piece, tokenizer, previous, tokenizer.decode([previous]))
            top = [{"token": int(i), "text": text(int(i)), "logprob": float(v)}
                   for v, i in zip(values[row], ids[row]) if math.isfinite(v)]
            entries.append({"token": token, "text": text(token), "logprob": float(chosen[row]), "top": top})
            previous = token
        return entries

    def hidden_states(self, row: int, count: int) -> torch.Tensor | None:
        """(tokens, layers, D): row `row`'s hidden states at the position that chose each of its `count` tokens."""
        return torch.stack([h[row] for h in self.hidden[:count]]) if self.hidden else None

    def attention_weights(self, row: int, count: int) -> list[torch.Tensor] | None:
        """Per answer token, (layers, heads, K): the weights of the position that chose it over the K before it."""
        return [a[row] for a in self.attentions[:count]] if self.keep_attentions else None

    def frame_attention(self, count: int) -> list[float] | None:
        """Each frame's share of the attention of the answer's `count` tokens (mean over them)."""
        if self.spans is None or not self.shares:
            return None
        return torch.stack(self.shares[:count]).mean(0).tolist()


def piece(tokenizer, previous: int, before: str, token: int) -> str:
    """A token's text where it stands, after `previous` (whose own text is `before`); alone, a SentencePiece token
    would lose its leading space."""
    both = tokenizer.decode([previous, token])
    return both[len(before):] if both.startswith(before) else tokenizer.decode([token])


def frame_spans(ids: list[int], placeholder: int, frames: int, grid: torch.Tensor | None) -> torch.Tensor:
    """(frames, len(ids)): how much each prompt position counts for each sampled frame. The media's rows are the
    placeholder's positions, frame after frame in every family. Qwen's tower merges each two consecutive frames
    into one set of patches (the grid's t): those two count its positions half each. Rows past an even split
    (LLaVA-OneVision's newline after the last frame) count for the last frame."""
    where = [i for i, token in enumerate(ids) if token == placeholder]
    groups = int(grid[0, 0]) if grid is not None else frames
    group_of = [frame * groups // frames for frame in range(frames)]
    per, spans = len(where) // groups, torch.zeros(frames, len(ids))
    for frame, group in enumerate(group_of):
        end = len(where) if group == groups - 1 else (group + 1) * per
        spans[frame, where[group * per : end]] = 1 / group_of.count(group)
    return spans
