"""Iteration-level scheduler: schedule() -> SchedulerOutput; update() applies sampled tokens. No torch.

Each step (vLLM v1 shape):
1. running requests first, in admission order, each gets
   ``min(num_uncomputed, budget)`` tokens: 1 for a decode, a chunk for a
   prefill. When the KV pool is full the newest running request is preempted
   (blocks freed, recomputed later) so the older ones can go on.
2. then waiting requests (FIFO) join while there are sequence slots, token
   budget and blocks; a long prompt joins with a chunk that fits the budget.
A request samples a token only in a step that reaches the end of its known
tokens; a partial prefill chunk samples nothing.

``lookahead`` may then turn a decode-only step into several greedy steps run in one
forward call (multi-step scheduling, vLLM's ``num_scheduler_steps``); the engine applies
their tokens one step at a time through ``update``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..config import EngineConfig
from .block_manager import BlockManager
from .outputs import FinishReason
from .request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int          # tokens forwarded this step, from request.num_computed_tokens
    start: int               # == request.num_computed_tokens when scheduled

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    # Decodes (1 token) first, then prefill chunks: the runner batches decodes together.
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Finished while scheduling: a lone sequence that outgrew the whole KV pool.
    finished: list[Request] = field(default_factory=list)
    # > 1: decode-only greedy steps run back to back in one forward call (``lookahead``).
    num_steps: int = 1

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_kv_exhausted = 0   # requests ended "length" because alone they outgrew the whole pool

    # ---- queue -------------------------------------------------------------
    def add(self, req: Request) -> None:
        assert req.num_prompt_tokens < self.max_model_len, "checked by the engine"
        self.waiting.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Take ``req`` out of the queues and free its blocks (idempotent)."""
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.bm.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.finished_time = time.monotonic()

    def _preempt(self, req: Request) -> None:
        # Recompute later: the KV is dropped but the tokens (prompt + output) are kept.
        self.bm.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _chunk(self, req: Request, budget: int) -> int:
        n = min(req.num_uncomputed, budget)
        if self.config.long_prefill_token_threshold:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    # ---- the step ----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, budget)
            while not self.bm.grow(req, n):
                if req is self.running[-1] and len(self.running) == 1:
                    # Alone and still out of blocks: it can never grow; end it instead of
                    # preempting it forever.
                    self.finish(req, FinishReason.LENGTH)
                    self.num_kv_exhausted += 1
                    out.finished.append(req)
                    break
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing after it can fit either

        if not out.preempted:
            self._admit(out, budget)
        # Decodes first: the runner batches single-token queries in one attention call.
        out.scheduled.sort(key=lambda s: s.num_tokens != 1)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            dep = req.wait_for
            if dep is not None and not dep.prefilled and not dep.is_finished and self.bm.enable_prefix_caching:
                # A sibling sample: wait until the first sample's prompt blocks are cached.
                skipped.append(self.waiting.popleft())
                continue
            n = self._chunk(req, budget)
            cached = self.bm.admit(req, n)
            if cached is None:
                break  # FIFO: no overtaking when the pool is full
            self.waiting.popleft()
            req.num_computed_tokens = cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = cached
            n = min(n, req.num_uncomputed)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def lookahead(self, out: SchedulerOutput, max_steps: int) -> None:
        """Let ``out`` run up to ``max_steps`` greedy decode steps in one forward call
        (``out.num_steps``), with KV slots for all of them.

        Only when every scheduled request is a decode whose next tokens the model alone fixes
        (``Request.plain_greedy``, no logprobs, no grammar), and when no waiting request has a
        free sequence slot, so a newcomer is not held back up to ``max_steps`` steps. Steps are
        capped by each request's remaining max_tokens and context (no token is computed past a
        length finish) and by the free blocks. EOS and stop strings are found token by token as
        the engine applies the steps; the steps computed past a request's stop are dropped
        (their slots are freed with its blocks), up to ``max_steps - 1`` forwards of its row.
        """
        if ((self.waiting and len(self.running) < self.config.max_num_seqs)
                or out.preempted or out.finished or not out.scheduled):
            return
        steps = max_steps
        for s in out.scheduled:
            req = s.request
            if (s.num_tokens != 1 or not s.samples or not req.plain_greedy or req.params.logprobs is not None
                    or req.matcher is not None):
                return
            steps = min(steps, req.params.max_new_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens)
        if steps <= 1:
            return
        bm = self.bm
        need = sum(max(0, bm.blocks_needed(s.request.num_computed_tokens + steps) - len(s.request.block_table))
                   for s in out.scheduled)
        if need > bm.num_free_blocks:
            return
        for s in out.scheduled:
            bm.grow(s.request, steps)
        out.num_steps = steps

    def update(self, out: SchedulerOutput, sampled: list[int], logprobs: list[float] | None) -> list[Request]:
        """Advance counters by what the step computed and append sampled tokens.

        ``sampled[j]`` belongs to the j-th scheduled request that ``samples``.
        Returns the requests that got a new token (finished ones included).
        Token-level stops (EOS, stop ids, length) finish requests here; text
        stops are the engine's, via ``finish``.
        """
        now = time.monotonic()
        changed: list[Request] = []
        j = 0
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_tokens
            self.bm.cache_full_blocks(req)
            if not s.samples:
                continue
            tok = sampled[j]
            if req.logprobs is not None and logprobs is not None:
                req.logprobs.append(logprobs[j])
            j += 1
            req.token_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
            changed.append(req)
            self._check_token_stop(req, tok)
        assert j == len(sampled)
        return changed

    def _check_token_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if req.matcher is not None:
            # Every sampled token, EOS and stop ids included, advances the grammar; the
            # sampler's mask makes a refusal impossible.
            ok = req.matcher.accept(tok)
            assert ok, f"{req.request_id}: token {tok} outside the grammar (mask not applied?)"
            if req.matcher.is_stopped:
                # Only EOS could follow: the constrained output is complete, whatever
                # min_new_tokens or ignore_eos ask for.
                return self.finish(req, FinishReason.STOP, tok if tok in req.eos_token_ids else None)
        if req.num_output_tokens >= p.min_new_tokens:
            if not p.ignore_eos and tok in req.eos_token_ids:
                return self.finish(req, FinishReason.STOP, tok)
            if tok in p.stop_token_ids:
                return self.finish(req, FinishReason.STOP, tok)
        if req.num_output_tokens >= p.max_new_tokens or req.num_tokens >= self.max_model_len:
            self.finish(req, FinishReason.LENGTH)
