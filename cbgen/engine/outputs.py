"""What the engine hands to front-ends: one ``RequestOutput`` per sequence per step.

These dataclasses are the only engine types a front-end needs. They carry no
tensors and no references into engine state, so they may be queued across
threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"        # EOS, a stop string or a stop token id
    LENGTH = "length"    # max_new_tokens or the context length reached
    ABORT = "abort"      # cancelled by the user / front-end
    ERROR = "error"      # rejected input (front-ends create these; the engine raises instead)


def mean_tpot(first_token_at: float | None, finished_at: float | None, num_tokens: int) -> float | None:
    """Mean time per output token after the first (None before two tokens exist)."""
    if first_token_at is None or finished_at is None or num_tokens < 2:
        return None
    return (finished_at - first_token_at) / (num_tokens - 1)


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one position, as token ids (sampler -> request).

    All are natural logs under the raw model distribution: log_softmax of the
    logits before penalties, min_new_tokens suppression, temperature and
    top-k/top-p/min-p. ``token_id`` is the sampled token (for a prompt position,
    the prompt's own token there) and ``rank`` its 1-based rank in the vocabulary
    (1 + the number of tokens strictly more likely). ``top_token_ids`` /
    ``top_logprobs``: the k most likely tokens, most likely first (k = the
    request's ``logprobs`` or ``prompt_logprobs``; empty for k = 0).
    """

    token_id: int
    logprob: float
    rank: int
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Logprob:
    """One token with its log-probability, decoded for output.

    ``bytes`` are the token's exact UTF-8 bytes (from the tokenizer's byte-level
    mapping: a token may hold part of a character); ``token`` is their text, with
    bytes that do not form whole characters shown as ``\\xNN`` escapes.
    ``rank`` is set for the chosen token, None for the alternatives.
    """

    token_id: int
    token: str
    bytes: bytes
    logprob: float
    rank: int | None = None


@dataclass(frozen=True)
class PositionLogprobs:
    """The chosen token at one position and the top-k alternatives (most likely first).

    ``text_offset``: for a generated token, the characters of the output text
    before it (where its text starts); None for a prompt token.
    """

    chosen: Logprob
    top: tuple[Logprob, ...]
    text_offset: int | None = None


@dataclass(frozen=True)
class RequestMetrics:
    """Timings are ``time.monotonic()`` seconds; derived figures are properties."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_prompt_tokens: int
    num_cached_tokens: int      # prompt tokens served from the prefix cache
    num_generated_tokens: int
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def total_time(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        return mean_tpot(self.first_token_time, self.finished_time, self.num_generated_tokens)

    @property
    def tokens_per_s(self) -> float | None:
        t = self.tpot
        return 1.0 / t if t else None

    def to_dict(self) -> dict:
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {
            "queue_s": r(self.queue_time),
            "ttft_s": r(self.ttft),
            "total_s": r(self.total_time),
            "tpot_s": r(self.tpot),
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2),
        }


@dataclass
class RequestOutput:
    """One sequence's progress in one step.

    ``request_id`` is the id given to ``add_request``; ``index`` is the sample
    number (0..n-1) when ``n > 1``. ``text`` is the whole text so far (stop
    strings removed unless asked); ``text_delta`` what this step added.
    ``finished`` is set exactly once per sequence, on its last output.
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    text_delta: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    num_samples: int = 1                       # n of the parent request
    # When asked (params.logprobs), on the finished output only: one entry per generated
    # token that is part of the text (a trailing EOS and tokens cut by a stop string have none).
    logprobs: list[PositionLogprobs] | None = None
    stop_reason: str | int | None = None       # the stop string / token id that matched
    extra: dict = field(default_factory=dict)  # front-end data passed through add_request
    # When asked (params.prompt_logprobs), on sample 0's finished output: one entry per
    # prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Constrained output, on the last output: the text is a complete match of the grammar
    # (not cut by max_new_tokens, a stop string or an abort). None when unconstrained.
    structured_complete: bool | None = None
