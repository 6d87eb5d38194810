"""The transformers baselines, each on a fresh copy of the model.

- ``hf``: ``model.generate`` one prompt at a time (optionally capped: the first
  ``max_prompts`` prompts run, the rest are extrapolated per request).
- ``static``: ``model.generate`` on left-padded batches of ``batch_size``; a
  batch runs until its longest sequence finishes.
- ``generate_batch``: transformers' own continuous batching
  (``GenerationMixin.generate_batch``), with its defaults.

All greedy, same ``max_new_tokens``; ``ignore_eos`` clears the EOS ids so
generation runs to the limit. Token timings come from a streamer that stamps
every decoding step (``hf``, ``static``) or from ``record_timestamps``
(``generate_batch``).
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from .measure import RequestTiming, RunResult
from .workloads import Workload


class StepClock:
    """A transformers streamer that only records when each decoding step produced its tokens.

    ``generate`` calls ``put`` once with the prompt, then once per step with
    the step's new token of every row.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _gen_config(model, wl: Workload):
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.max_new_tokens = wl.max_new_tokens
    gc.min_new_tokens = None
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        setattr(gc, name, None)   # greedy: no warpers (and no warnings about them)
    if gc.pad_token_id is None:
        eos = gc.eos_token_id
        gc.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if wl.ignore_eos:
        gc.eos_token_id = None
    return gc


def _eos_set(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _trim(row: list[int], eos: set[int], ignore_eos: bool) -> list[int]:
    """Generated ids up to and including the first EOS (the rest is padding)."""
    if ignore_eos:
        return row
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


@torch.inference_mode()
def run_hf_sequential(model, wl: Workload, max_prompts: int | None) -> RunResult:
    """One ``generate`` call per prompt. TTFT here is per prompt from its own
    call (service time, no queueing behind earlier prompts)."""
    gc = _gen_config(model, wl)
    eos = _eos_set(model)
    n = min(wl.num_requests, max_prompts) if max_prompts else wl.num_requests
    timings, ids_out, total = [], [], 0.0
    for ids in wl.prompts[:n]:
        clock = StepClock()
        x = torch.tensor([ids], device=model.device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc, streamer=clock)
        t1 = time.perf_counter()
        total += t1 - t0
        gen = _trim(out[0, len(ids):].tolist(), eos, wl.ignore_eos)
        ids_out.append(gen)
        timings.append(RequestTiming(len(gen), clock.times[0] - t0, clock.times[len(gen) - 1] - t0))
    res = RunResult("hf", wl.name, wl.num_requests, n, total, requests=timings, token_ids=ids_out)
    res.notes.append("ttft/latency: per prompt from its own generate() call (no queueing)")
    if res.extrapolated:
        res.notes.append(f"measured the first {n} of {wl.num_requests} prompts; projected_wall_s scales "
                         "the measured time per request to the whole workload")
    return res


@torch.inference_mode()
def run_hf_static(model, wl: Workload, batch_size: int) -> RunResult:
    """Left-padded batches of ``batch_size``, one after another."""
    gc = _gen_config(model, wl)
    eos = _eos_set(model)
    pad = gc.pad_token_id
    timings, ids_out = [], []
    t0 = time.perf_counter()
    for b in range(0, wl.num_requests, batch_size):
        batch = wl.prompts[b:b + batch_size]
        width = max(len(p) for p in batch)
        x = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        clock = StepClock()
        out = model.generate(x, attention_mask=mask, generation_config=gc, streamer=clock)
        for row in out[:, width:].tolist():
            gen = _trim(row, eos, wl.ignore_eos)
            ids_out.append(gen)
            timings.append(RequestTiming(len(gen), clock.times[0] - t0, clock.times[len(gen) - 1] - t0))
    wall = time.perf_counter() - t0
    res = RunResult("static", wl.name, wl.num_requests, wl.num_requests, wall, requests=timings,
                    token_ids=ids_out)
    res.notes.append(f"batch {batch_size}, left-padded; a batch runs until its longest sequence ends; "
                     "tokens counted up to each sequence's own EOS")
    return res


def _cb_config(model, wl: Workload, kv_cache_gb: float):
    """transformers' defaults, except the KV cache: room for every request of ``wl`` at full
    length (capped at ``kv_cache_gb``, cbgen's budget) instead of 60% of free RAM, which on CPU
    means allocating many GB (and an attention mask that grows with the cache) up front."""
    from transformers import ContinuousBatchingConfig

    from ..engine.architectures import spec_of

    bytes_per_token = spec_of(model).kv_bytes_per_token
    cfg = ContinuousBatchingConfig()
    page = cfg.page_size
    need = sum(-(-(len(p) + wl.max_new_tokens) // page) for p in wl.prompts)
    cap = max(1, int(kv_cache_gb * 2**30) // (bytes_per_token * page))
    cfg.num_blocks = min(need, cap)
    return cfg


@torch.inference_mode()
def run_generate_batch(model, wl: Workload, kv_cache_gb: float) -> RunResult:
    """``model.generate_batch``: transformers' continuous-batching defaults, KV cache of ``kv_cache_gb``.

    ``wall_s`` runs from the first request's creation to the last finish, so
    the manager's setup (KV allocation, warmup) is left out; it is ``setup_s``.
    """
    gc = _gen_config(model, wl)
    cb = _cb_config(model, wl, kv_cache_gb)
    attn = model.config._attn_implementation
    cb_log = logging.getLogger("ContinuousBatchingLogger")
    level = cb_log.level
    cb_log.setLevel(logging.ERROR)   # "eos_token_id not set ... disabled" is what ignore_eos asks for
    try:
        t0 = time.perf_counter()
        results = model.generate_batch(wl.prompts, generation_config=gc, max_new_tokens=wl.max_new_tokens,
                                       continuous_batching_config=cb, record_timestamps=True)
        t1 = time.perf_counter()
    finally:
        cb_log.setLevel(level)
    outs = list(results.values())
    failed = [o.request_id for o in outs if o.error is not None]
    if len(outs) != wl.num_requests or failed:
        raise RuntimeError(f"generate_batch returned {len(outs)} of {wl.num_requests} results "
                           f"({len(failed)} failed)")
    start = min(o.created_time for o in outs)
    end = max(o.lifespan[1] for o in outs)
    timings, ids_out = [], []
    for o in outs:
        gen = list(o.generated_tokens)
        ids_out.append(gen)
        ts = o.timestamps or []
        timings.append(RequestTiming(len(gen), ts[0] - start if ts else None, ts[-1] - start if ts else None))
    res = RunResult("generate_batch", wl.name, wl.num_requests, wl.num_requests, end - start, requests=timings,
                    setup_s=(t1 - t0) - (end - start), token_ids=ids_out)
    res.notes.append(f"defaults but num_blocks={cb.num_blocks} x {cb.page_size} tokens (all requests at "
                     f"full length, at most {kv_cache_gb:g} GiB as cbgen); model loaded with attn={attn}; wall from first request created to last "
                     f"finished; whole call incl. manager setup: {t1 - t0:.2f} s")
    return res
