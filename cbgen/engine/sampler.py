"""(logits, per-request params) -> token ids. Vectorised over the batch.

Random draws use the exponential-race trick (argmax p/q, q ~ Exp(1)), so a
seeded request's noise depends only on (seed, output position): the same
output whatever else is in the batch, and after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .logprobs import PromptLogprobs, token_logprobs
from .outputs import TokenLogprobs
from .request import Request

NEG_INF = float("-inf")


@dataclass
class GrammarMasks:
    """Allowed-token bitmasks for the constrained rows of a step.

    ``bitmask`` int32 [len(rows), ceil(V / 32)]: bit ``j`` of word ``w`` allows
    token ``32 * w + j`` (llguidance's layout); ``rows`` index the step's sampling
    requests. ``blocked`` bool [len(rows), V]: the bitmask expanded, when the
    runner already did it off the critical path (on the mask worker)."""
    rows: list[int]
    bitmask: torch.Tensor
    blocked: torch.Tensor | None = None


def blocked_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size], True where ``bitmask`` does not allow the token."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return (((bitmask.unsqueeze(-1) >> shifts) & 1) == 0).flatten(1)[:, :vocab_size]


def _apply_grammar(logits: torch.Tensor, masks: GrammarMasks) -> None:
    """Disallowed tokens -> -inf, in place, before penalties, warping and argmax,
    so greedy and random rows alike only pick tokens the grammar allows."""
    blocked = masks.blocked if masks.blocked is not None else blocked_tokens(masks.bitmask, logits.shape[1])
    blocked = blocked.to(logits.device)
    if len(masks.rows) == logits.shape[0]:   # every row constrained (a file sharing one schema)
        logits.masked_fill_(blocked, NEG_INF)
        return
    rows = torch.tensor(masks.rows, device=logits.device)
    logits[rows] = logits[rows].masked_fill(blocked, NEG_INF)


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per sampling row: the sampled token's logprobs (raw model distribution, before
    # warping) for rows whose request asked, else None; None when no row asked.
    logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)   # filled by the runner
    # A multi-step result (SchedulerOutput.num_steps > 1): steps[i][j] is step i's token of the
    # j-th request; token_ids is steps[0].
    steps: list[list[int]] | None = None


def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    for row, r in enumerate(reqs):
        p = r.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            # HF semantics: every token seen (prompt + output) is penalised once.
            seen = torch.tensor(sorted(set(r.token_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.num_output_tokens:
            out = torch.tensor(r.output_token_ids, device=logits.device)
            counts = torch.zeros(logits.shape[1], device=logits.device).index_add_(
                0, out, torch.ones(len(out), device=logits.device))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _suppress_stops(logits: torch.Tensor, reqs: list[Request]) -> None:
    """Below ``min_new_tokens`` the EOS and stop ids cannot be sampled."""
    for row, r in enumerate(reqs):
        if r.num_output_tokens < r.params.min_new_tokens:
            ids = [t for t in (*r.eos_token_ids, *r.params.stop_token_ids) if t < logits.shape[1]]
            if ids:
                logits[row, ids] = NEG_INF


def _warp(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p -> probabilities. Rows are all non-greedy."""
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in reqs], device=dev).unsqueeze(1)
    logits = logits / temps
    top_ks = [r.params.top_k for r in reqs]
    top_ps = [r.params.top_p for r in reqs]
    if any(top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        V = logits.shape[1]
        ks = torch.tensor([k if k > 0 else V for k in top_ks], device=dev).unsqueeze(1)
        ranks = torch.arange(V, device=dev).unsqueeze(0)
        drop = ranks >= ks
        if any(p < 1.0 for p in top_ps):
            probs = sorted_logits.masked_fill(drop, NEG_INF).softmax(-1)
            before = probs.cumsum(-1) - probs   # mass strictly above this token
            drop |= before >= torch.tensor(top_ps, device=dev).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
        logits = torch.empty_like(logits).scatter_(1, idx, sorted_logits)
    probs = logits.softmax(-1)
    min_ps = [r.params.min_p for r in reqs]
    if any(min_ps):
        thresh = torch.tensor(min_ps, device=dev).unsqueeze(1) * probs.max(-1, keepdim=True).values
        probs = probs.masked_fill(probs < thresh, 0.0)
    return probs


def _noise(probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    q = torch.empty_like(probs).exponential_()
    for row, r in enumerate(reqs):
        if r.params.seed is not None:
            g = torch.Generator(device=probs.device)
            # Stateless per position: (seed, sample index, output position).
            g.manual_seed((r.params.seed * 1_000_003 + r.index * 7919 + r.num_output_tokens) % (2**63))
            q[row] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
    return q


def sample(logits: torch.Tensor, reqs: list[Request],
           argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
           masks: GrammarMasks | None = None) -> SampleResult:
    """``logits`` [len(reqs), V] for the requests that sample this step, in order.

    ``argmax``: a native ``logits.float().argmax(-1)`` for bf16 logits (fused_ops),
    used when every row is plain greedy, the common batch-job step. Logprobs are
    computed on the rows that asked only (a copy taken before any penalty or mask:
    the raw model distribution). ``masks``: grammar bitmasks of the constrained
    rows, applied before sampling (``logits`` is modified in place)."""
    lp_rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    # A copy of the asking rows only, taken before penalties edit the logits in place.
    raw = logits.index_select(0, torch.tensor(lp_rows, device=logits.device)) if lp_rows else None
    token_ids = _sample_tokens(logits, reqs, argmax, masks)
    if raw is None:
        return SampleResult(token_ids)
    entries = token_logprobs(raw, [token_ids[i] for i in lp_rows], [reqs[i].params.logprobs for i in lp_rows])
    per_row: list[TokenLogprobs | None] = [None] * len(reqs)
    for i, e in zip(lp_rows, entries):
        per_row[i] = e
    return SampleResult(token_ids, per_row)


def _sample_tokens(logits: torch.Tensor, reqs: list[Request],
                   argmax: Callable[[torch.Tensor], torch.Tensor] | None,
                   masks: GrammarMasks | None = None) -> list[int]:
    if masks is not None:
        _apply_grammar(logits, masks)
    if argmax is not None and logits.dtype == torch.bfloat16 and all(r.plain_greedy for r in reqs):
        return argmax(logits.contiguous()).tolist()
    logits = logits.float()
    if any(r.params.has_penalties for r in reqs):
        _apply_penalties(logits, reqs)
    if any(r.num_output_tokens < r.params.min_new_tokens for r in reqs):
        _suppress_stops(logits, reqs)
    tokens = logits.argmax(-1)
    rand_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if rand_rows:
        sub = [reqs[i] for i in rand_rows]
        rows = torch.tensor(rand_rows, device=logits.device)
        probs = _warp(logits[rows], sub)
        tokens[rows] = (probs / _noise(probs, sub)).argmax(-1)
    return tokens.tolist()
