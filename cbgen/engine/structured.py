"""Grammar-constrained decoding on llguidance: compile specs, one matcher per sequence, token bitmasks.

The only module that imports the constraint library (the ``cbgen[structured]``
extra), and only when the first constrained request arrives, so unconstrained
runs never pay for it and a missing extra is a per-request error, not a crash.

Library: llguidance (Microsoft; the constraint engine of llama.cpp, vLLM and
transformers), chosen over xgrammar in benchmarks/NOTES.md. Its bitmask layout
is int32 words, bit ``j`` of word ``w`` allowing token ``32 * w + j``.

Invariants (checked by tests/test_structured_engine.py):
* a request's ``GuidedMatcher`` has consumed exactly its output tokens between
  steps; preemption keeps the output tokens (only KV is recomputed), so the
  matcher never rolls back;
* the matcher allows EOS only where the grammar accepts; a matcher that can take
  nothing but EOS ends its request with ``stop`` at once (no extra step).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from .structured_params import StructuredOutputsParams

MISSING_EXTRA = ("structured output needs the optional extra cbgen[structured] "
                 "(pip install 'cbgen[structured]', which adds llguidance)")


def _llg():
    """The llguidance module; ValueError naming the extra when it is not installed."""
    try:
        import llguidance
        import llguidance.hf  # noqa: F401  (from_tokenizer)
    except ImportError as e:
        raise ValueError(f"{MISSING_EXTRA}: {e}") from None
    return llguidance


def one_line(message: str) -> str:
    """llguidance's multi-line messages (source excerpt, caret line) as one line."""
    keep = []
    for ln in message.splitlines():
        s = ln.strip()
        if not s or set(s) <= {"^", " "} or (s.split(" ", 1)[0].isdigit() and " | " in s[:8]):
            continue
        keep.append(s)
    return " ".join(keep)


class GuidedMatcher:
    """One sequence's grammar state (an llguidance ``LLMatcher``). No torch.

    ``num_consumed`` counts the tokens accepted so far; between steps it equals
    the request's ``num_output_tokens``."""

    __slots__ = ("raw", "num_consumed")

    def __init__(self, raw) -> None:
        self.raw = raw
        self.num_consumed = 0

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. False: the grammar forbids it (the mask was not applied)."""
        ok = self.raw.consume_token(token_id)
        self.num_consumed += ok
        return ok

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete match (EOS would be allowed)."""
        return self.raw.is_accepting()

    @property
    def is_stopped(self) -> bool:
        """Nothing but EOS can follow: the constrained output is done."""
        return self.raw.is_stopped()


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled spec. ``new_matcher`` deep-copies a template matcher: the
    grammar is compiled once however many requests (and samples) use it."""

    params: StructuredOutputsParams
    template: object = field(repr=False)

    def new_matcher(self) -> GuidedMatcher:
        return GuidedMatcher(self.template.deep_copy())


class GrammarCache:
    """Compiles ``StructuredOutputsParams`` for one tokenizer, once per distinct spec.

    ``hf_tokenizer`` must be a transformers fast tokenizer; ``vocab_size`` is the
    model's logits width (masks cover it; ids past the tokenizer are never
    allowed); ``eos_token_ids`` are the ids the grammar allows where it accepts.
    The llguidance tokenizer (~1 s to build) is made on the first compile.
    Thread-safe: requests may be added from any thread.
    """

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self._ll_tokenizer = None
        self._cache: dict[StructuredOutputsParams, CompiledGrammar] = {}
        self._lock = threading.Lock()
        self.num_compiles = 0

    def _tokenizer(self):
        if self._ll_tokenizer is None:
            llg = _llg()
            eos = list(self.eos_token_ids) or None
            self._ll_tokenizer = llg.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar for ``params`` (cached by content).

        Raises ValueError "field '<field>': invalid <kind>: <library message>"
        for a spec the library rejects, or naming ``cbgen[structured]`` when the
        library is missing. A rejected spec is not cached (it costs one compile
        per line that repeats it, and never a wrong answer)."""
        with self._lock:
            hit = self._cache.get(params)   # equality is (kind, spec): content, not source
            if hit is not None:
                return hit
            try:
                llg = _llg()
                tok = self._tokenizer()
            except ValueError as e:
                raise ValueError(f"field '{params.field}': {e}") from None
            try:
                grammar = _grammar_text(llg, params)
            except ValueError as e:
                raise ValueError(f"field '{params.field}': invalid {_WHAT[params.kind]}: {one_line(str(e))}") from None
            self.num_compiles += 1
            matcher = llg.LLMatcher(tok, grammar, log_level=0)
            if matcher.is_error():
                raise ValueError(f"field '{params.field}': invalid {_WHAT[params.kind]}: "
                                 f"{one_line(matcher.get_error())}")
            compiled = CompiledGrammar(params, matcher)
            self._cache[params] = compiled
            return compiled


_WHAT = {"json_object": "JSON mode", "json_schema": "JSON schema", "regex": "regex",
         "choice": "choice list", "grammar": "grammar"}


def _grammar_text(llg, p: StructuredOutputsParams) -> str:
    """The llguidance grammar for ``p``. JSON has fixed separators (Python's
    ``json.dumps`` style, what models see most) and no free whitespace: a small
    model allowed optional whitespace can fill its whole budget with it. A
    schema's own ``x-guidance`` options override these."""
    opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    if p.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=opts)
    if p.kind == "json_schema":
        return llg.LLMatcher.grammar_from_json_schema(p.spec, defaults=opts)
    if p.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(p.spec)
    if p.kind == "choice":
        return llg.grammar_from("choice", p.spec)
    return llg.grammar_from("grammar", p.spec)   # Lark, or GBNF converted to Lark


@dataclass
class MaskTimes:
    """Bitmask work, for benchmarks: ``fill_s`` is the library's time filling
    masks, ``wait_s`` the time the step waited for them after its forward."""
    steps: int = 0
    rows: int = 0
    fill_s: float = 0.0
    wait_s: float = 0.0


class BitmaskWorker:
    """Fills next-token bitmasks on a worker thread while the forward runs.

    The masks of a step depend only on tokens accepted by the previous
    ``update``, so they are known before the forward starts. llguidance drops
    the GIL while it computes; several matchers are filled in parallel by its
    ``LLExecutor`` (a Rust thread pool).

    ``inline``: fill in the calling thread instead (``CBGEN_MASK_OVERLAP=0``).
    On a 2-core CPU the worker competes with the forward's OpenMP threads, so
    which is faster is a measurement (benchmarks/structured_speed.py runs both)."""

    def __init__(self, inline: bool | None = None) -> None:
        llg = _llg()
        self._executor = llg.LLExecutor()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbgen-masks")
        self.inline = os.environ.get("CBGEN_MASK_OVERLAP", "1") == "0" if inline is None else inline
        self.times = MaskTimes()

    def submit(self, matchers: list[GuidedMatcher], ptr: int, row_bytes: int, num_rows: int,
               then: Callable[[], None] | None = None) -> "Future[None]":
        """Fill row ``i`` of the int32 buffer at ``ptr`` (``num_rows`` rows of
        ``row_bytes``) with ``matchers[i]``'s mask, then call ``then`` (on the
        worker: more work that overlaps the forward). The caller keeps the
        buffer alive until the future is done."""
        assert len(matchers) <= num_rows
        if self.inline:
            done: Future[None] = Future()
            self._fill(matchers, ptr, row_bytes, num_rows, then)
            done.set_result(None)
            return done
        return self._thread.submit(self._fill, matchers, ptr, row_bytes, num_rows, then)

    def _fill(self, matchers: list[GuidedMatcher], ptr: int, row_bytes: int, num_rows: int,
              then: Callable[[], None] | None) -> None:
        t0 = time.perf_counter()
        if len(matchers) == 1:
            matchers[0].raw.unsafe_compute_mask_ptr(ptr, row_bytes)
        else:
            self._executor.unsafe_compute_mask_ptr([(m.raw, i) for i, m in enumerate(matchers)],
                                                   ptr, row_bytes, num_rows)
        self.times.fill_s += time.perf_counter() - t0
        self.times.steps += 1
        self.times.rows += len(matchers)
        if then is not None:
            then()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
