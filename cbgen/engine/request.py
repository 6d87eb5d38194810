"""Request: one sequence's tokens, progress counter and KV block table. No torch.

The single progress counter is ``num_computed_tokens``: the tokens of
``token_ids`` whose KV is in the cache. A step schedules
``num_tokens - num_computed_tokens`` tokens (capped by the budget); a prefill
chunk and a decode are the same thing at different sizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..config import SamplingParams
from .outputs import FinishReason, RequestMetrics, TokenLogprobs

if TYPE_CHECKING:
    from .structured import GuidedMatcher


class RequestStatus(Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to recompute
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    index: int = 0                      # sample number when params.n > 1
    arrival_time: float = field(default_factory=time.monotonic)
    extra: dict[str, Any] = field(default_factory=dict)
    # Sibling whose prompt blocks this one should reuse (n > 1): admitted after it prefilled.
    wait_for: "Request | None" = None
    # Grammar state when the output is constrained (one per sample); see structured.py.
    matcher: "GuidedMatcher | None" = None

    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0          # prompt tokens found in the prefix cache on first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks registered so far
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None          # one per output token, when asked
    # One per prompt token, [0] is None; only sample 0 of a request computes them.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "a request needs at least one prompt token"
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    @property
    def key(self) -> tuple[str, int]:
        return (self.request_id, self.index)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def prefilled(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def plain_greedy(self) -> bool:
        """Its next token is the argmax of the raw logits: greedy, no penalties, and its
        ``min_new_tokens`` met (no stop token to suppress)."""
        p = self.params
        return p.greedy and not p.has_penalties and self.num_output_tokens >= p.min_new_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet: the runner keeps the logits
        of those prompt positions, and the prefix cache must not skip them."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def add_prompt_logprobs(self, start: int, entries: list[TokenLogprobs]) -> None:
        """Record the logprobs of prompt tokens ``start .. start + len(entries) - 1``
        (``start`` is always the first one missing: the runner asks only for those)."""
        assert self.prompt_logprobs is not None and start == len(self.prompt_logprobs), (start, self.key)
        self.prompt_logprobs.extend(entries)

    def metrics(self) -> RequestMetrics:
        return RequestMetrics(
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time,
            finished_time=self.finished_time,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
            num_generated_tokens=self.num_output_tokens,
            num_preemptions=self.num_preemptions,
        )
