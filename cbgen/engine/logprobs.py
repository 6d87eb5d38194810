"""Log-probabilities from logits rows: the chosen token's, its rank, and the top-k.

Tensor code called by the runner (prompt positions) and the sampler (sampled
tokens), only ever on the rows of requests that asked: a request without
logprobs adds no log_softmax, sort or top-k to a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .outputs import TokenLogprobs
from .request import Request

# Rows per log_softmax: bounds the float32 copy of a long prompt chunk (rows x vocab).
_ROWS_PER_PASS = 128


def token_logprobs(logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprobs]:
    """``logits`` [R, V] (any float dtype) raw model logits; ``token_ids`` [R] the token
    each row chose; ``ks`` [R] how many top alternatives each row wants (0..V).

    Returns one ``TokenLogprobs`` per row: log_softmax in float32,
    the chosen token's logprob and 1-based rank, and the ``ks[i]`` most likely tokens
    (``torch.topk``, sorted, most likely first)."""
    assert logits.shape[0] == len(token_ids) == len(ks)
    out: list[TokenLogprobs] = []
    for a in range(0, len(token_ids), _ROWS_PER_PASS):
        b = a + _ROWS_PER_PASS
        out += _pass(logits[a:b], token_ids[a:b], ks[a:b])
    return out


def _pass(logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprobs]:
    lp = logits.float().log_softmax(-1)     # (torch's log_softmax measured faster than logsumexp on CPU)
    chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device).unsqueeze(1))   # [R, 1]
    top_v, top_i = lp.topk(max(max(ks), 1), dim=-1)              # sorted, most likely first
    # Rank = 1 + tokens strictly more likely. Every such token is in the top-k when the
    # chosen one is at least as likely as the k-th (always, for greedy rows); only the
    # other rows need a pass over the vocabulary.
    ranks = (top_v > chosen).sum(-1) + 1
    outside = (chosen < top_v[:, -1:]).squeeze(1).nonzero().squeeze(1)
    if outside.numel():
        ranks[outside] = (lp[outside] > chosen[outside]).sum(-1) + 1
    chosen_l, rank_l = chosen.squeeze(1).tolist(), ranks.tolist()
    top_l, top_i_l = top_v.tolist(), top_i.tolist()
    return [TokenLogprobs(t, chosen_l[i], rank_l[i], tuple(top_i_l[i][:ks[i]]), tuple(top_l[i][:ks[i]]))
            for i, t in enumerate(token_ids)]


@dataclass(frozen=True)
class PromptSpan:
    """Prompt tokens ``start .. start + count - 1`` of ``request``, predicted by ``count``
    consecutive rows of the step's extra logits beginning at ``row``."""
    request: Request
    start: int
    row: int
    count: int


@dataclass(frozen=True)
class PromptLogprobs:
    """What a step computed for one request's prompt: ``Request.add_prompt_logprobs`` input."""
    request: Request
    start: int
    entries: list[TokenLogprobs]


def prompt_span(req: Request, start: int, num_tokens: int, row: int) -> PromptSpan | None:
    """The prompt tokens whose logprobs a step forwarding positions ``start .. start +
    num_tokens - 1`` of ``req`` yields and ``req`` still lacks, or None. ``row``: where
    the span's rows will begin among the step's extra (prompt) logits rows; they are
    the logits at positions ``span.start - 1 ..``.

    The logits at position p predict token p + 1, so positions up to the prompt's
    second-to-last give prompt tokens; the last prompt position predicts the first
    output token (a sampling row, not a prompt one). Tokens already recorded (a
    recompute after preemption) are not asked for again.
    """
    if not req.needs_prompt_logprobs:
        return None
    assert req.prompt_logprobs is not None
    first = max(start, len(req.prompt_logprobs) - 1)          # position predicting the first missing token
    end = min(start + num_tokens, req.num_prompt_tokens - 1)
    if first >= end:
        return None
    return PromptSpan(req, first + 1, row, end - first)


def prompt_logprobs(logits: torch.Tensor, spans: list[PromptSpan], first_row: int) -> list[PromptLogprobs]:
    """``logits`` [N, V]: the step's kept logits; a span's rows are ``first_row +
    span.row ..``. Each span's tokens get their logprobs with the request's top-k."""
    out = []
    for s in spans:
        rows = logits[first_row + s.row:first_row + s.row + s.count]
        targets = s.request.prompt_token_ids[s.start:s.start + s.count]
        k = s.request.params.prompt_logprobs or 0
        out.append(PromptLogprobs(s.request, s.start, token_logprobs(rows, targets, [k] * s.count)))
    return out
