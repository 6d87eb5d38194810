"""Result records and the writers that put them on a stream, plus in-order release.

Crash safety: every record is serialised first and written with ONE
``write()`` of the whole text (newline included), then flushed. An interrupted
run leaves at most one half-written last line, which ``resume`` cuts off.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Generic, Sequence, TextIO, TypeVar

from cbgen.engine.outputs import PositionLogprobs, RequestOutput
from cbgen.engine.structured_params import JSON_KINDS
from cbgen.io import logprob_format as lpf
from cbgen.io.records import InputError, InputRecord
from cbgen.io.structured_result import structured_fields

T = TypeVar("T")


class OutputClosed(Exception):
    """The reader of the output went away (EPIPE, e.g. ``| head``): stop quietly.

    The CLI should also point stdout at devnull before exiting, or Python's
    final flush reports the broken pipe again.
    """


@dataclass
class ResultRecord:
    """The outcome of one input (all ``n`` samples). ``error`` is set iff ``finish_reason == "error"``."""

    id: str
    line: int
    text: str | None                     # sample 0; None for errors
    finish_reason: str                   # "stop" | "length" | "abort" | "error"
    choices: list[dict] | None = None    # [{index, text, finish_reason[, logprobs]}], only when n > 1
    usage: dict | None = None            # prompt_tokens, cached_tokens, completion_tokens (all samples)
    timings: dict | None = None          # RequestMetrics.to_dict() of the sample that finished last
    params: dict | None = None           # SamplingParams.to_dict()
    model: str | None = None
    error: str | None = None
    logprobs: list[PositionLogprobs] | None = None  # sample 0, when asked (choices carry each sample's)
    chat: bool = True                    # OpenAI object: chat.completion vs text_completion
    messages: list[dict] | None = None   # the input, when a front-end echoes it (chat's /save)
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # when asked; [0] is None
    row: Any = None                      # io.table_rows.TableRow of the input, for table outputs; not in to_dict
    structured: dict | None = None       # constrained output: {type, name?, complete} (structured_result.py)
    parsed: Any = None                   # with a JSON constraint: the value, or None when incomplete

    def to_dict(self) -> dict[str, Any]:
        """The cbgen JSONL record; ``choices`` / ``logprobs`` / ``messages`` /
        ``prompt_logprobs`` only when present (logprob_format.py has their shape)."""
        d = {"id": self.id, "line": self.line, "text": self.text, "finish_reason": self.finish_reason,
             "choices": lpf.jsonl_choices(self.choices), "usage": self.usage, "timings": self.timings,
             "params": self.params, "model": self.model, "error": self.error,
             "logprobs": lpf.jsonl_logprobs(self.logprobs), "messages": self.messages,
             "prompt_logprobs": lpf.jsonl_logprobs(self.prompt_logprobs)}
        for optional in ("choices", "logprobs", "messages", "prompt_logprobs"):
            if d[optional] is None:
                del d[optional]
        if self.structured is not None:
            d["structured"] = self.structured
            if self.structured["type"] in JSON_KINDS:
                d["parsed"] = self.parsed
        return d


def _reason(o: RequestOutput) -> str:
    return o.finish_reason.value if o.finish_reason is not None else "abort"  # unfinished = cut short


def result_from_outputs(rec: InputRecord, outputs: Sequence[RequestOutput], model: str | None = None) -> ResultRecord:
    """One record from the final ``RequestOutput`` of each of ``rec``'s samples."""
    assert outputs, f"no outputs for {rec.id!r}"
    outs = sorted(outputs, key=lambda o: o.index)
    first, m = outs[0], outs[0].metrics
    last = max(outs, key=lambda o: o.metrics.finished_time or 0.0)  # so total_s is the record's wall time
    usage = {"prompt_tokens": m.num_prompt_tokens, "cached_tokens": m.num_cached_tokens,
             "completion_tokens": sum(o.metrics.num_generated_tokens for o in outs)}
    choices = ([{"index": o.index, "text": o.text, "finish_reason": _reason(o),
                 **({"logprobs": o.logprobs} if o.logprobs is not None else {})} for o in outs]
               if len(outs) > 1 else None)
    result = ResultRecord(rec.id, rec.line_no, first.text, _reason(first), choices, usage,
                          last.metrics.to_dict(), rec.params.to_dict(), model, None, first.logprobs, rec.is_chat,
                          prompt_logprobs=first.prompt_logprobs, row=rec.extra.get("row"))
    if rec.structured is not None:
        result.structured, result.parsed, per_sample = structured_fields(rec.structured, outs)
        for c, (complete, parsed) in zip(choices or [], per_sample):
            c["complete"] = complete
            if rec.structured.is_json:
                c["parsed"] = parsed
    return result


def error_result(item: InputError | InputRecord, message: str | None = None, model: str | None = None) -> ResultRecord:
    """An error record for a rejected line (``InputError``) or a valid input the engine refused (``message``)."""
    if isinstance(item, InputError):
        return ResultRecord(item.id, item.line_no, None, "error", model=model, error=message or item.message,
                            row=item.extra.get("row"))
    assert message, "an engine rejection needs a message"
    return ResultRecord(item.id, item.line_no, None, "error", params=item.params.to_dict(), model=model,
                        error=message, chat=item.is_chat, row=item.extra.get("row"))


class Writer:
    """Writes one ``ResultRecord`` per ``write`` call as one ``stream.write`` + flush."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        enc = (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "").replace("_", "")
        self.ascii = enc not in ("utf8", "utf8sig")  # escape non-ASCII rather than fail mid-run

    def format(self, rec: ResultRecord) -> str:
        """The full text for ``rec`` including its trailing newline; ``""`` writes nothing."""
        raise NotImplementedError

    def write(self, rec: ResultRecord) -> None:
        s = self.format(rec)
        if not s:
            return
        try:
            self.stream.write(s)
            self.stream.flush()
        except BrokenPipeError as e:
            raise OutputClosed(str(e)) from e

    def close(self, complete: bool = True) -> None:
        """The run is over (``complete``: every input has its record). Stream writers have nothing to do."""

    def _json(self, d: dict) -> str:
        return json.dumps(d, ensure_ascii=self.ascii) + "\n"


class JsonlWriter(Writer):
    """cbgen records, one JSON object per line (``ResultRecord.to_dict``)."""

    def format(self, rec: ResultRecord) -> str:
        return self._json(rec.to_dict())


class OpenAIWriter(Writer):
    """OpenAI Batch output lines; errors have ``response: null, error: {code, message}``."""

    def format(self, rec: ResultRecord) -> str:
        line: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": rec.id,
                                "response": None, "error": None}
        if rec.finish_reason in ("error", "abort"):  # OpenAI returns no partial output for cancelled requests
            code = "batch_cancelled" if rec.finish_reason == "abort" else "invalid_request"
            line["error"] = {"code": code, "message": rec.error or "cancelled before it finished"}
            return self._json(line)
        samples = rec.choices or [{"index": 0, "text": rec.text, "finish_reason": rec.finish_reason,
                                   "logprobs": rec.logprobs}]
        if rec.chat:
            choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                        "logprobs": lpf.chat_logprobs(c.get("logprobs")), "finish_reason": c["finish_reason"]}
                       for c in samples]
        else:
            choices = [{"index": c["index"], "text": c["text"], "logprobs": lpf.completion_logprobs(c.get("logprobs")),
                        "finish_reason": c["finish_reason"]} for c in samples]
            if rec.prompt_logprobs is not None:   # vLLM puts them on each completions choice
                for c in choices:
                    c["prompt_logprobs"] = lpf.vllm_prompt_logprobs(rec.prompt_logprobs)
        u = rec.usage or {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}
        usage = {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                 "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                 "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}
        body = {"id": f"{'chatcmpl' if rec.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if rec.chat else "text_completion",
                "created": int(time.time()), "model": rec.model, "choices": choices, "usage": usage}
        if rec.chat and rec.prompt_logprobs is not None:   # vLLM: on the chat response itself
            body["prompt_logprobs"] = lpf.vllm_prompt_logprobs(rec.prompt_logprobs)
        line["response"] = {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}
        return self._json(line)


class TextWriter(Writer):
    """Only the generated text: each sample's text, trailing newlines trimmed,
    followed by one blank line. Error records write nothing (the driver reports
    them on stderr); use JSONL when outputs must be split reliably."""

    def format(self, rec: ResultRecord) -> str:
        if rec.text is None:
            return ""
        texts = [c["text"] for c in rec.choices] if rec.choices else [rec.text]
        return "".join(t.rstrip("\n") + "\n\n" for t in texts)


WRITERS: dict[str, type[Writer]] = {"jsonl": JsonlWriter, "openai": OpenAIWriter, "text": TextWriter}


def make_writer(fmt: str, stream: TextIO) -> Writer:
    """The writer for ``--format`` ``fmt`` (jsonl | openai | text | parquet | csv | tsv).

    For the table formats ``stream`` is an opened ``io.table_output.TableOutput``."""
    if fmt in ("parquet", "csv", "tsv"):
        from cbgen.io.table_output import TableWriter
        return TableWriter(stream)
    if fmt not in WRITERS:
        raise ValueError(f"format={fmt!r} is invalid: expected one of {', '.join(WRITERS)}")
    return WRITERS[fmt](stream)


class ReorderBuffer(Generic[T]):
    """Releases results in input order (``--order input``).

    ``reserve()`` hands out tickets in admission order; ``push(ticket, item)``
    returns the items now releasable. The buffer cannot bound itself (one slow
    head holds back every later result), so the driver admits a new input only
    while not ``full``: then ``pending <= outstanding <= limit`` records,
    whatever the input size (limit ~ max in-flight + prefetch queue size).
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._next_ticket = 0
        self._next_out = 0
        self._waiting: dict[int, T] = {}

    def reserve(self) -> int:
        self._next_ticket += 1
        return self._next_ticket - 1

    def push(self, ticket: int, item: T) -> list[T]:
        assert self._next_out <= ticket < self._next_ticket and ticket not in self._waiting, ticket
        self._waiting[ticket] = item
        out = []
        while self._next_out in self._waiting:
            out.append(self._waiting.pop(self._next_out))
            self._next_out += 1
        return out

    @property
    def pending(self) -> int:
        """Results held back by an earlier unfinished one."""
        return len(self._waiting)

    @property
    def outstanding(self) -> int:
        """Reserved and not yet released (in flight + pending)."""
        return self._next_ticket - self._next_out

    @property
    def full(self) -> bool:
        return self.limit is not None and self.outstanding >= self.limit

    def drain(self) -> list[T]:
        """Everything held, in order, skipping tickets never pushed (shutdown after an abort)."""
        out = [self._waiting[t] for t in sorted(self._waiting)]
        self._waiting.clear()
        self._next_out = self._next_ticket
        return out
