"""Engine: add_request / abort / step() -> list[RequestOutput] / has_unfinished.

``step`` is three verbs: schedule, execute, update; a decode-only greedy batch may run
several steps in one call (multi-step scheduling: scheduler.lookahead, applied one step at
a time by ``_apply_steps``). ``add_request`` and
``abort`` may be called from any thread: they only queue work, which the
stepping thread picks up at the start of its next step, so a request added
while others decode joins at the next step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from ..config import EngineConfig, SamplingParams
from .block_manager import BlockManager
from .detokenizer import Detokenizer
from .outputs import FinishReason, RequestOutput
from .request import Request
from .architectures import as_model
from .model import Model
from .model_spec import eos_ids
from .runner import ModelRunner, max_len_for, num_blocks_for
from .scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from .structured import GrammarCache
from .structured_params import StructuredOutputsParams
from .token_bytes import TokenBytes


@dataclass(frozen=True)
class SequenceProgress:
    """A read-only view of one live sequence, for progress displays."""
    request_id: str
    index: int
    state: str                 # queued | prefill | decode
    num_prompt_tokens: int
    num_computed_tokens: int
    num_output_tokens: int
    max_new_tokens: int


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float            # fraction of KV blocks in use
    num_kv_blocks: int
    prefix_hit_rate: float     # prompt tokens served from the prefix cache / prompt tokens looked up
    num_preemptions: int
    # Requests that ended with finish_reason "length" before max_tokens or the context length
    # because, running alone, they outgrew the whole KV pool (Scheduler.schedule).
    num_kv_exhausted: int
    num_steps: int             # forwards (each step of a multi-step call counts)
    num_forward_tokens: int
    num_generated_tokens: int


class Engine:
    def __init__(self, model: Model | Any, tokenizer, config: EngineConfig | None = None, *,
                 impl: str = "auto", max_model_len: int | None = None,
                 eos_token_ids: tuple[int, ...] | None = None) -> None:
        """``model``: a Model (model.py), or a transformers causal LM, which is wrapped as
        ``architectures.as_model(model, impl)`` says, with ``max_model_len`` (default: its
        config's) and ``eos_token_ids`` (default: its generation config's, then the
        tokenizer's); both only apply to such a wrap, a Model carries its own in its spec.
        Raises UnsupportedModelError for a model or ``impl`` it cannot serve."""
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        if not isinstance(model, Model):
            if eos_token_ids is None:
                eos_token_ids = eos_ids(tokenizer, getattr(model, "generation_config", None))
            model = as_model(model, impl, max_model_len=max_model_len, eos_token_ids=tuple(eos_token_ids))
        self.notice: str | None = None   # one line for the front-end to print on stderr, once
        if not model.spec.kv_pool:       # the transformers fallback (hf_fallback.py): caches per sequence
            self.config = replace(self.config, enable_prefix_caching=False)
            self.notice = model.notice
        self.model = model
        spec = model.spec
        self.max_model_len = max_len_for(self.config, spec)
        self.vocab_size = spec.vocab_size
        self.eos_token_ids = frozenset(spec.eos_token_ids)
        num_blocks = num_blocks_for(self.config, spec, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager, self.max_model_len)
        self.runner = ModelRunner(model, self.config, num_blocks)
        self._release_kv = getattr(model, "release", None)   # a model keeping its own KV cache (Model.release)
        self.grammars = GrammarCache(tokenizer, self.vocab_size, tuple(self.eos_token_ids))
        self._lock = threading.Lock()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._live: dict[str, list[Request]] = {}   # request_id -> its samples, until all finish
        self._detok: dict[tuple[str, int], Detokenizer] = {}
        self.num_steps = 0
        self.num_generated_tokens = 0
        self._special: frozenset[int] | None = None     # special token ids, built with _token_bytes
        self._token_bytes: TokenBytes | None = None   # built at the first logprobs output

    def set_deterministic(self, on: bool) -> None:
        """Switch batch-invariant execution (EngineConfig.deterministic) on or off from the
        next step. Requests already running keep the KV they computed before the switch, so
        only requests added after it are covered. Raises UnsupportedModelError (from the
        runner) where it cannot hold; the setting is then unchanged."""
        self.runner.set_deterministic(on)
        self.config = replace(self.config, deterministic=on)

    @classmethod
    def from_loaded(cls, loaded, config: EngineConfig | None = None) -> "Engine":
        """From a ``cbgen.models.LoadedModel`` (duck-typed: ``model``, ``tokenizer``, ``spec``, ``impl``)."""
        model = loaded.model
        if not isinstance(model, Model):
            spec = loaded.spec
            model = as_model(model, loaded.impl, max_model_len=spec.max_model_len if spec else None,
                             eos_token_ids=spec.eos_token_ids if spec else eos_ids(loaded.tokenizer, model.generation_config))
        return cls(model, loaded.tokenizer, config)

    # ---- submission (any thread) ----------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    *, extra: dict[str, Any] | None = None, arrival_time: float | None = None,
                    structured: StructuredOutputsParams | None = None) -> None:
        """Queue a request; it joins the batch at the next step.

        ``structured``: constrain the output (each of the ``n`` samples gets its
        own matcher; the spec is compiled once per distinct content).

        Raises ValueError naming the field for an invalid request: empty or
        out-of-vocabulary prompt, a prompt that leaves no room in the context,
        a duplicate live id, params that are not SamplingParams, a spec the
        constraint library rejects, or a constraint without the structured extra.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if not prompt_token_ids:
            raise ValueError("prompt: is empty (expected at least one token)")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(prompt_token_ids)} tokens leave no room to generate "
                             f"within the context length of {self.max_model_len} tokens")
        capacity = self.block_manager.num_tokens
        if len(prompt_token_ids) >= capacity:
            raise ValueError(f"prompt: {len(prompt_token_ids)} tokens leave no room to generate in the KV cache "
                             f"of {capacity} tokens (raise --kv-cache-gb)")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: {bad} is outside the vocabulary [0, {self.vocab_size})")
        grammar = self.grammars.compile(structured) if structured is not None else None
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        reqs: list[Request] = []
        for i in range(params.n):
            reqs.append(Request(request_id, list(prompt_token_ids), params, self.eos_token_ids, index=i,
                                arrival_time=arrival, extra=dict(extra or {}),
                                wait_for=reqs[0] if i else None,
                                matcher=grammar.new_matcher() if grammar is not None else None))
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request_id: {request_id!r} is already running")
            self._live[request_id] = reqs
            self._inbox.extend(reqs)

    def abort(self, request_id: str) -> bool:
        """Cancel a request (all its samples); its last output says ``abort``.
        Returns False when the id is not live."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._aborts.append(request_id)
            return True

    @property
    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    def live_ids(self) -> list[str]:
        with self._lock:
            return list(self._live)

    # ---- the step (one thread) -------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._drain_inbox()
        sched = self.scheduler.schedule()
        if self._release_kv is not None:
            for req in sched.preempted:
                self._release_kv(req.key)   # recomputed from position 0 when readmitted
        outputs += [self._output(req, new_tokens=0) for req in sched.finished]
        if sched.is_empty:
            return outputs
        if self.config.num_scheduler_steps > 1 and self.runner.takes_steps(len(sched.scheduled)):
            self.scheduler.lookahead(sched, self.config.num_scheduler_steps)
        result = self.runner.execute(sched)
        if result.steps is not None:
            return outputs + self._apply_steps(sched, result.steps)
        changed = self.scheduler.update(sched, result.token_ids, result.logprobs)
        for pl in result.prompt_logprobs:
            pl.request.add_prompt_logprobs(pl.start, pl.entries)
        self.num_steps += 1
        self.num_generated_tokens += len(result.token_ids)
        for req in changed:
            outputs.append(self._output(req, new_tokens=1))
        return outputs

    def _apply_steps(self, sched: SchedulerOutput, steps: list[list[int]]) -> list[RequestOutput]:
        """A multi-step result, applied one step at a time as single steps would be: ``update``
        appends each request's token and applies EOS, stop ids and length, the detokenizer stop
        strings; a request that finished takes no more (the rest of its row is dropped). One
        output per request for all its new tokens."""
        reqs = [s.request for s in sched.scheduled]
        new: dict[Request, int] = {}
        rows = list(range(len(reqs)))
        for step in steps:
            one = SchedulerOutput([ScheduledRequest(reqs[j], 1, reqs[j].num_computed_tokens) for j in rows])
            for req in self.scheduler.update(one, [step[j] for j in rows], None):
                self._add_text(req, req.output_token_ids[-1:])
                new[req] = new.get(req, 0) + 1
            rows = [j for j in rows if not reqs[j].is_finished]
            if not rows:
                break
        self.num_steps += len(steps)   # forwards run, the dropped ones included
        self.num_generated_tokens += sum(new.values())
        return [self._emit(req, req.output_token_ids[len(req.output_token_ids) - n:]) for req, n in new.items()]

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for req in inbox:
            p = req.params
            self._detok[req.key] = Detokenizer(self.tokenizer, p.stop, p.include_stop_str_in_output)
            self.scheduler.add(req)
        outputs = []
        for rid in aborts:
            for req in self._live.get(rid, []):
                if not req.is_finished:
                    self.scheduler.finish(req, FinishReason.ABORT)
                    outputs.append(self._output(req, new_tokens=0))
        return outputs

    def _output(self, req: Request, new_tokens: int) -> RequestOutput:
        new_ids = req.output_token_ids[len(req.output_token_ids) - new_tokens:] if new_tokens else []
        self._add_text(req, new_ids)
        return self._emit(req, new_ids)

    def _add_text(self, req: Request, new_ids: list[int]) -> None:
        """Detokenize ``req``'s new tokens and finish it at a stop string (once ``min_new_tokens``
        are out, as EOS and stop ids)."""
        if not new_ids:
            return
        stop = self._detok[req.key].add(new_ids, find_stop=req.num_output_tokens >= req.params.min_new_tokens)
        if stop is not None and not req.is_finished:
            self.scheduler.finish(req, FinishReason.STOP, stop)
        elif stop is not None and req.finish_reason is FinishReason.LENGTH:
            # The last allowed token completed a stop string: the text is cut there, so it
            # is a stop, not a length cut (vLLM checks stop strings before the length).
            req.finish_reason, req.stop_reason = FinishReason.STOP, stop

    def _emit(self, req: Request, new_ids: list[int]) -> RequestOutput:
        """``req``'s output after ``new_ids`` (already detokenized); retires it when finished."""
        detok = self._detok[req.key]
        if req.is_finished and req.stop_reason not in req.params.stop:
            detok.finish_text()
        delta = detok.delta(req.is_finished)
        out = RequestOutput(
            request_id=req.request_id, index=req.index, new_token_ids=new_ids, text_delta=delta,
            text=detok.text[:detok.emitted], token_ids=req.output_token_ids, finished=req.is_finished,
            finish_reason=req.finish_reason, metrics=req.metrics(), num_samples=req.params.n,
            stop_reason=req.stop_reason, extra=req.extra,
            structured_complete=_complete(req) if req.matcher is not None and req.is_finished else None)
        if req.is_finished:
            self._attach_logprobs(out, req, detok)
            self._retire(req)
        return out

    def _attach_logprobs(self, out: RequestOutput, req: Request, detok: Detokenizer) -> None:
        """Decode the finished request's logprobs and the prompt's. A request that stopped
        (EOS, stop string, stop id) has an entry per output token with text in ``out.text``,
        so a cut stop string and a trailing EOS drop theirs; one cut by length or abort keeps
        every token, including those of a character cut short (dropped from the text, shown
        in ``bytes``)."""
        if req.logprobs is None and req.prompt_logprobs is None:
            return
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.tokenizer)
        tb = self._token_bytes
        if req.logprobs is not None:
            kept = detok.num_tokens_in(len(out.text))
            if req.finish_reason is not FinishReason.STOP:
                # Cut by length or abort: the tokens of a character cut short (dropped from
                # the text) keep their entries, their bytes show it; special tokens do not.
                special = self._special_ids()
                while kept < len(req.logprobs) and req.output_token_ids[kept] not in special:
                    kept += 1
            out.logprobs = tb.positions(req.logprobs[:kept], detok.offsets[:kept])  # type: ignore[assignment]
        if req.prompt_logprobs is not None:
            out.prompt_logprobs = tb.positions(req.prompt_logprobs)

    def _special_ids(self) -> frozenset[int]:
        if self._special is None:
            self._special = frozenset(getattr(self.tokenizer, "all_special_ids", ()) or ()) | self.eos_token_ids
        return self._special

    def _retire(self, req: Request) -> None:
        self._detok.pop(req.key, None)
        if self._release_kv is not None:
            self._release_kv(req.key)
        with self._lock:
            samples = self._live.get(req.request_id)
            if samples is not None and all(r.is_finished for r in samples):
                del self._live[req.request_id]

    # ---- figures ----------------------------------------------------------
    def progress(self) -> list[SequenceProgress]:
        """Live sequences, running first. Safe from another thread: it copies
        the queues (retrying if the stepping thread changed them meanwhile)
        and reads only ints; a view may be one step stale."""
        for _ in range(5):
            try:
                reqs = list(self.scheduler.running) + list(self.scheduler.waiting)
                break
            except RuntimeError:
                continue
        else:
            return []
        out = []
        for r in reqs:
            state = ("queued" if r.status.value == "waiting" else
                     "prefill" if r.num_computed_tokens < r.num_prompt_tokens else "decode")
            out.append(SequenceProgress(r.request_id, r.index, state, r.num_prompt_tokens,
                                        r.num_computed_tokens, r.num_output_tokens, r.params.max_new_tokens))
        return out

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=bm.usage, num_kv_blocks=bm.num_blocks, prefix_hit_rate=bm.hit_rate,
            num_preemptions=self.scheduler.num_preemptions, num_kv_exhausted=self.scheduler.num_kv_exhausted,
            num_steps=self.num_steps,
            num_forward_tokens=self.runner.num_forward_tokens,
            num_generated_tokens=self.num_generated_tokens)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run ``prompts`` to completion; the final output of each (sample 0), in order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        for i, (ids, p) in enumerate(zip(prompts, plist)):
            self.add_request(str(i), ids, p)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished:
            for o in self.step():
                if o.finished and o.index == 0:
                    final[o.request_id] = o
        return [final[str(i)] for i in range(len(prompts))]


def _complete(req: Request) -> bool:
    """A finished constrained output is a whole match: the grammar accepts what it
    consumed, and neither a stop string nor an abort cut the text short of it."""
    return (req.matcher.is_accepting and not isinstance(req.stop_reason, str)
            and req.finish_reason in (FinishReason.STOP, FinishReason.LENGTH))
