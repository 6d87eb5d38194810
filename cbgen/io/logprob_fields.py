"""The logprob fields of an input line -> ``SamplingParams.logprobs`` (vLLM's meaning).

Three request shapes name the same thing differently:

* OpenAI chat (``/v1/chat/completions``): ``logprobs: bool`` and
  ``top_logprobs: int`` in [0, 20], which needs ``logprobs: true``.
* OpenAI legacy completions (``/v1/completions``): ``logprobs: int`` in [0, 5],
  the number of alternatives (0 = the chosen token's only); no ``top_logprobs``.
* cbgen lines: either of the above (``logprobs`` true/false or an integer in
  [0, 20]; ``top_logprobs`` with ``logprobs: true``).

All become ``logprobs: int | None`` (None = off). ``prompt_logprobs`` (vLLM's
extension, an integer in [0, 20]) passes through unchanged. A field left out or
null keeps the default (the command line's), so ``top_logprobs`` alone is valid
when the default already has logprobs on.
"""

from __future__ import annotations

from typing import Any

from cbgen.config import MAX_LOGPROBS, SamplingParams

MAX_LEGACY_LOGPROBS = 5   # OpenAI's limit for /v1/completions


class LogprobFieldError(ValueError):
    """A bad logprob field: ``field`` (the key as written) and ``what`` was expected."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(f"{field}: {what}")
        self.field, self.what = field, what


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(v: Any, hi: int) -> bool:
    return _is_int(v) and 0 <= v <= hi


def resolve_logprobs(values: dict[str, Any], defaults: SamplingParams,
                     api: str = "cbgen") -> tuple[bool, int | None]:
    """From one line's fields (``values``): whether it sets logprobs, and to what
    (vLLM's ``int | None``, ``top_logprobs`` folded in). ``api``: ``cbgen`` | ``chat`` |
    ``completions``. ``(False, None)`` when neither field is given (or both are null).

    Raises ``LogprobFieldError`` naming the field for a wrong type or range, or for
    ``top_logprobs`` without logprobs on."""
    lp, top = values.get("logprobs"), values.get("top_logprobs")
    if lp is None and top is None:
        return False, None
    if api == "completions":
        if top is not None:
            raise LogprobFieldError("top_logprobs", "not a /v1/completions field (give 'logprobs' as an "
                                    f"integer in [0, {MAX_LEGACY_LOGPROBS}])")
        if not _int_in(lp, MAX_LEGACY_LOGPROBS):
            raise LogprobFieldError("logprobs", f"expected null or an integer in [0, {MAX_LEGACY_LOGPROBS}] "
                                    "(the number of top logprobs per token)")
        return True, lp
    if lp is not None and not isinstance(lp, bool):
        if api == "chat":
            raise LogprobFieldError("logprobs", "expected true or false (give the number of alternatives "
                                    "as 'top_logprobs')")
        if not _int_in(lp, MAX_LOGPROBS):
            raise LogprobFieldError("logprobs", f"expected true, false or an integer in [0, {MAX_LOGPROBS}]")
        if top is not None:
            raise LogprobFieldError("top_logprobs", "conflicts with an integer 'logprobs' (give 'logprobs': "
                                    "true with 'top_logprobs', or 'logprobs' as the number alone)")
        return True, lp
    if top is not None and not _int_in(top, MAX_LOGPROBS):
        raise LogprobFieldError("top_logprobs", f"expected an integer in [0, {MAX_LOGPROBS}]")
    on = lp if lp is not None else defaults.logprobs is not None
    if not on:
        if top is not None:
            raise LogprobFieldError("top_logprobs", "needs 'logprobs': true")
        return True, None
    return True, top if top is not None else (defaults.logprobs or 0)


def cli_defaults(defaults: SamplingParams, logprobs: bool, top_logprobs: int | None,
                 prompt_logprobs: int | None) -> SamplingParams:
    """The command line's ``--logprobs`` / ``--top-logprobs K`` (implies ``--logprobs``) /
    ``--prompt-logprobs K`` applied to ``defaults``. Raises ValueError naming the option."""
    for name, v in (("--top-logprobs", top_logprobs), ("--prompt-logprobs", prompt_logprobs)):
        if v is not None and not _int_in(v, MAX_LOGPROBS):
            raise ValueError(f"{name} {v}: expected an integer in [0, {MAX_LOGPROBS}]")
    lp = top_logprobs if top_logprobs is not None else (0 if logprobs else None)
    return defaults.replace(logprobs=lp, prompt_logprobs=prompt_logprobs)
