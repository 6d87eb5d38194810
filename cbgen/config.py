"""Frozen configuration dataclasses, validated at construction.

Every validation error is a ``ValueError`` whose message names the field, the
value given and the allowed range, so front-ends can show it as one line.
"""

from __future__ import annotations

import math

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20   # top logprobs per position (OpenAI's top_logprobs limit; vLLM's default max_logprobs)


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$CBGEN_CACHE``, else ``~/.cache/cbgen``: converted models, built kernels."""
    root = cache_dir or os.environ.get("CBGEN_CACHE") or "~/.cache/cbgen"
    return Path(root).expanduser()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty off Linux): the dtype choice and
    the native kernel's build key both depend on them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    # vLLM's meaning: the number of most likely tokens to report with each generated
    # token's log-probability (0 = the sampled token only); None = no logprobs. Both are
    # of the raw model distribution, before temperature, penalties and top-k/p.
    logprobs: int | None = None
    # The same for every prompt token after the first (vLLM's prompt_logprobs).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept lists / a single string from JSON and normalise to tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
               "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(_is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
               "min_new_tokens", self.min_new_tokens,
               f"an integer in [0, max_new_tokens={self.max_new_tokens}]")
        _check(_is_num(self.temperature) and 0.0 <= self.temperature <= 100.0,
               "temperature", self.temperature, "a number in [0, 100] (0 = greedy)")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0,
               "top_p", self.top_p, "a number in (0, 1]")
        _check(_is_num(self.min_p) and 0.0 <= self.min_p < 1.0,
               "min_p", self.min_p, "a number in [0, 1)")
        _check(_is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
               "repetition_penalty", self.repetition_penalty, "a number in (0, 10]")
        _check(_is_num(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
               "presence_penalty", self.presence_penalty, "a number in [-2, 2]")
        _check(_is_num(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
               "frequency_penalty", self.frequency_penalty, "a number in [-2, 2]")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED),
               "seed", self.seed, f"null or an integer in [0, {MAX_SEED}]")
        _check(_is_int(self.n) and 1 <= self.n <= 64, "n", self.n, "an integer in [1, 64]")
        _check(all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
               "stop", list(self.stop), "at most 16 non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", list(self.stop_token_ids), "a list of token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and 0 <= v <= MAX_LOGPROBS), name, v,
                   f"null or an integer in [0, {MAX_LOGPROBS}] (top logprobs per token)")
        for name in ("include_stop_str_in_output", "ignore_eos"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, base: "SamplingParams", values: Mapping[str, Any]) -> "SamplingParams":
        """``base`` overridden by ``values``; unknown keys are an error naming them."""
        unknown = set(values) - cls.field_names()
        if unknown:
            raise ValueError(f"unknown sampling field(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.field_names())}")
        return dataclasses.replace(base, **values)


@dataclass(frozen=True)
class EngineConfig:
    """Engine capacity. Token budgets bound the work of one step (one forward)."""

    # Running sequences at once. 256 (vLLM's default too), not 128: on the 271 dev prompts
    # (natural EOS) 128 spent more than half the run draining at 16-127 rows once the
    # queue was empty; 256 starts nearly every request at once (NOTES.md changes 9 and 20).
    # Bigger batches are cheaper per token here: the weights are streamed once per step.
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512    # tokens in one forward (prefill chunks + decodes)
    block_size: int = 16                 # tokens per KV block
    num_kv_blocks: int | None = None     # None: derived from kv_cache_gb and the model
    # Memory budget for the KV pool when num_kv_blocks is None. 2 GiB holds 256 sequences of
    # ~350 tokens of SmolLM2-135M without preemption. Pages are touched only as blocks are used.
    kv_cache_gb: float = 2.0
    enable_prefix_caching: bool = True
    max_model_len: int | None = None     # None: the model's context length
    long_prefill_token_threshold: int = 0  # >0: cap a single prefill chunk below the budget
    # Decode attention: "native" = the C kernel reading the paged pool in place
    # (built once with the system C compiler), "torch" = gather + SDPA,
    # "auto" = native when it builds and supports the model's shapes.
    attention: str = "auto"
    # Batch-invariant execution (cbgen/engine/batch_invariant.py): a request's greedy or
    # seeded output depends only on its prompt and params, not on the batch, chunked-prefill
    # boundaries, prefix-cache hits, preemption or the thread count. Needs the native
    # forward and the native attention kernel.
    deterministic: bool = False
    # Multi-step scheduling (vLLM's num_scheduler_steps): a decode-only step of greedy
    # requests, with nothing waiting, runs up to this many steps in one native call
    # (scheduler.lookahead). 1 turns it off. It applies where the one-call native decode
    # step does (bf16 llama-family, up to ~8 sequences) and is bit-identical to single steps;
    # it saves the per-step Python (~0.5-0.9 ms of ~11 ms at one sequence, NOTES.md change
    # 19) at the cost of tokens arriving in bursts and a newcomer or abort waiting up to that
    # many steps.
    num_scheduler_steps: int = 8

    def __post_init__(self) -> None:
        _check(_is_int(self.max_num_seqs) and 1 <= self.max_num_seqs <= 4096,
               "max_num_seqs", self.max_num_seqs, "an integer in [1, 4096]")
        _check(_is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 16,
               "max_num_batched_tokens", self.max_num_batched_tokens, "an integer >= 16")
        _check(self.max_num_batched_tokens >= self.max_num_seqs,
               "max_num_batched_tokens", self.max_num_batched_tokens,
               f">= max_num_seqs ({self.max_num_seqs}) so every running sequence can decode")
        _check(_is_int(self.block_size) and 1 <= self.block_size <= 1024,
               "block_size", self.block_size, "an integer in [1, 1024]")
        _check(self.num_kv_blocks is None or (_is_int(self.num_kv_blocks) and self.num_kv_blocks >= 1),
               "num_kv_blocks", self.num_kv_blocks, "null or an integer >= 1")
        _check(_is_num(self.kv_cache_gb) and 0 < self.kv_cache_gb < math.inf,
               "kv_cache_gb", self.kv_cache_gb, "a finite number > 0")
        _check(self.max_model_len is None or (_is_int(self.max_model_len) and self.max_model_len >= 2),
               "max_model_len", self.max_model_len, "null or an integer >= 2")
        _check(_is_int(self.long_prefill_token_threshold) and self.long_prefill_token_threshold >= 0,
               "long_prefill_token_threshold", self.long_prefill_token_threshold, "an integer >= 0")
        _check(self.attention in ("auto", "native", "torch"),
               "attention", self.attention, "one of auto, native, torch")
        _check(isinstance(self.deterministic, bool), "deterministic", self.deterministic, "true or false")
        _check(_is_int(self.num_scheduler_steps) and 1 <= self.num_scheduler_steps <= 256,
               "num_scheduler_steps", self.num_scheduler_steps, "an integer in [1, 256]")
        _check(not (self.deterministic and self.attention == "torch"), "attention", self.attention,
               "auto or native with deterministic (batch invariance needs the native kernel)")


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how. ``model=None`` is the embedded default."""

    model: str | None = None
    dtype: str = "auto"          # auto | float32 | bfloat16
    device: str = "auto"         # auto | cpu | cuda
    threads: int | None = None   # None: torch's default (all cores)
    cache_dir: str | None = None  # None: $CBGEN_CACHE or ~/.cache/cbgen
    # How the model runs (the one knob; cbgen/engine/architectures.py): "native" = cbgen's
    # own forward from config.json + safetensors (no transformers modelling import, ~1.5 s
    # faster start); "transformers" = transformers' modules with the paged attention;
    # "auto" = native where the architecture has one, else transformers' modules, else
    # the one-sequence-at-a-time fallback.
    impl: str = "auto"
    # Weight-only quantization of the projections (cbgen/engine/quantize.py): "none" | "int8" |
    # "auto" (int8 where it speeds decode up here, quantize.choose_auto; resolved at load).
    quantize: str = "none"

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"),
               "dtype", self.dtype, "one of auto, float32, bfloat16, float16")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               "device", self.device, "auto, cpu or cuda[:N]")
        _check(self.threads is None or (_is_int(self.threads) and self.threads >= 1),
               "threads", self.threads, "an integer >= 1")
        _check(self.impl in ("auto", "native", "transformers"),
               "impl", self.impl, "one of auto, native, transformers")
        _check(self.quantize in ("none", "int8", "auto"), "quantize", self.quantize, "none, int8 or auto")


# The command-line option that sets each field, for messages that must name what the user
# typed (cli's option errors, records' refusal of a whole-run setting on one input line).
OPTION_OF = {
    "max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-batched-tokens",
    "kv_cache_gb": "--kv-cache-gb", "enable_prefix_caching": "--no-prefix-cache", "attention": "--attention",
    "deterministic": "--deterministic", "num_scheduler_steps": "--num-scheduler-steps",
    "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
    "min_p": "--min-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed", "stop": "--stop",
    "n": "--samples", "dtype": "--dtype", "threads": "--threads", "impl": "--impl", "quantize": "--quantize",
}

__all__ = ["SamplingParams", "EngineConfig", "ModelConfig", "OPTION_OF", "field"]
