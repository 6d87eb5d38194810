"""One input line -> ``InputRecord`` | ``InputError`` | ``None`` (blank line).

Formats, detected per line (a file may mix them):

* blank (whitespace only): skipped, ``None``; it still counts for line numbers.
* plain text: a line whose first non-blank character is not ``{``. The line,
  minus its terminator, is one user turn (kind ``text``, sent as ``messages``).
* ``{"prompt": str, ...}``: a raw completion prompt (kind ``prompt``); no chat
  template, so ``--system`` does not apply.
* ``{"messages": [{"role", "content"}, ...], ...}``: a chat (kind ``messages``).
* OpenAI Batch envelope, recognised by ``custom_id`` or ``body`` without a top-level
  ``prompt`` or ``messages`` (a ``body`` column beside a prompt is a dataset's) (kind
  ``openai``): ``url`` ``/v1/chat/completions`` (``body.messages``, the default)
  or ``/v1/completions`` (``body.prompt``).

A line starting with ``{`` is always JSON: invalid JSON is an error, not text.
Invisible characters before it (a BOM left mid-file by ``cat a b``, zero-width
spaces, NBSP) do not change that: they are dropped from the start of every line.

Sampling fields override the defaults per line: any ``SamplingParams`` field
name, plus ``max_tokens`` / ``max_completion_tokens`` for ``max_new_tokens``;
``null`` means "use the default". In the OpenAI format they live in ``body``
and every other body key (``model``, ``user``, ...) is ignored. In the cbgen
format ``id``, ``prompt``, ``messages`` and ``metadata`` are structural; any
other key is ignored (datasets carry extra columns) unless it looks like a typo
of a sampling field (``temprature``), which is an error.
Chat-template controls (``continue_final_message``, ``tools``, ...) sit beside
the sampling fields, at top level or in ``body``: see ``io/chat_controls.py``.
Output constraints (``response_format``, ``regex``, ``choice``, ``grammar``)
are parsed by ``structured_fields`` into ``InputRecord.structured``.

The id is ``id`` / ``custom_id`` as a string (an integer id ``7`` is ``"7"``),
else the default id ``"<source>:<line_no>"`` (``"prompts.jsonl:7"``,
``"stdin:7"``; ``"input:7"`` when no source is named). Default ids are
reserved: ``LineParser`` refuses an explicit id that is the default id of
another line of the run's sources, whichever comes first, so a default id can
never collide with an explicit one. It also reports duplicate ids and skips
resumed ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Collection

from cbgen.config import OPTION_OF, EngineConfig, SamplingParams
from cbgen.engine.structured_params import StructuredOutputsParams
from cbgen.io.chat_controls import CONTROL_KEYS, ChatTemplateControls, ControlError, parse_controls
from cbgen.io.encoding import invalid_message
from cbgen.io.field_error import FieldError as _Bad
from cbgen.io.field_error import show as _show
from cbgen.io.logprob_fields import LogprobFieldError, resolve_logprobs
from cbgen.io.structured_fields import CBGEN_FIELDS, parse_structured

# OpenAI's names for max_new_tokens, and vLLM's for min_new_tokens (SamplingParams.min_tokens,
# which its OpenAI server takes in the body too).
ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
FIELDS = SamplingParams.field_names()
KNOWN_SAMPLING = FIELDS | ALIASES.keys() | {"top_logprobs"}
CBGEN_KEYS = {"id", "prompt", "messages", "metadata", *CBGEN_FIELDS}
# cbgen's option name for a field (--samples), which a line might use; below the typo cutoff.
OTHER_NAMES = {"samples": "n"}
# Engine and model settings hold for the whole run; a line naming one would otherwise be
# ignored while its author believes it applied. Generic words a dataset may carry as a
# column (model, device, threads, attention) stay ignored like any other extra key.
RUN_SETTINGS = {k: OPTION_OF[k] for k in ({f.name for f in dataclasses.fields(EngineConfig)} | {"dtype", "quantize"})
                & OPTION_OF.keys() - {"attention"}}
RUN_SETTINGS["max_batched_tokens"] = OPTION_OF["max_num_batched_tokens"]   # the option's own spelling
ROLES = ("system", "user", "assistant")
OPENAI_URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
DEFAULT_SOURCE = "input"          # the source name when a caller names none
# Format characters nobody means to start a prompt with, dropped from the start of a line:
# BOM / zero-width no-break space, its byte-swapped form, zero-width space, non-joiner and
# joiner, word joiner, invisible operators, Mongolian vowel separator, soft hyphen.
INVISIBLE = "\ufeff\ufffe\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\u180e\u00ad"
# Bidirectional marks and embeddings: skipped to see whether a line is JSON, but a text
# prompt keeps them (right-to-left text may start with one).
BIDI = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c"
_LEADING = re.compile(f"[\\s{INVISIBLE}{BIDI}]*")
# SamplingParams' ValueError format (config._check): "<name>=<repr> is invalid: expected <allowed>".
_SP_ERROR = re.compile(r"(?P<name>\w+)=(?P<got>.*) is invalid: expected (?P<expected>.*)", re.S)


@dataclass(frozen=True)
class InputRecord:
    """A valid input. Exactly one of ``prompt`` (raw) / ``messages`` (chat) is set."""

    id: str
    line_no: int                       # 1-based within its source
    kind: str                          # "text" | "prompt" | "messages" | "openai"
    prompt: str | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    raw_format: str                    # "cbgen" | "openai"
    extra: dict[str, Any] = field(default_factory=dict)  # openai url/method/model; cbgen metadata
    chat_controls: ChatTemplateControls | None = None     # None: the defaults (see io/chat_controls.py)
    structured: StructuredOutputsParams | None = None   # the output constraint (structured_fields.py)
    # Where it came from, as errors name it ("prompts.jsonl line 3", "data.parquet row 7");
    # set by LineParser.admit, "line N" when no source is known.
    location: str = ""

    @property
    def where(self) -> str:
        return self.location or f"line {self.line_no}"

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class InputError:
    """A rejected line. ``message`` is one line naming the line, the field and what was expected."""

    id: str
    line_no: int
    field: str                         # "json", "encoding", "temperature", "messages[1].content", ...
    message: str
    extra: dict[str, Any] = field(default_factory=dict)  # table inputs: the row (io.table_rows.TableRow)

    def __str__(self) -> str:
        return self.message


def _text(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise _Bad(name, f"expected a string, got {_show(v)}")
    try:  # lone surrogates (bad bytes from the reader, or "\ud800" escapes) would crash the tokenizer
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad(name, f"invalid UTF-8 at character {e.start + 1}") from None
    return v


def _content(v: Any, name: str) -> str:
    if isinstance(v, list):  # OpenAI content parts: only text parts are supported
        for i, p in enumerate(v):
            if not (isinstance(p, dict) and p.get("type") == "text"):
                raise _Bad(f"{name}[{i}]", f"expected a text part {{type: text, text}}, got {_show(p)}")
        return "".join(_text(p.get("text"), f"{name}[{i}].text") for i, p in enumerate(v))
    if not isinstance(v, str):
        raise _Bad(name, f"expected a string or a list of text parts, got {_show(v)}")
    return _text(v, name)


def _messages(v: Any, name: str, system: str | None) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise _Bad(name, f"expected a non-empty list of {{role, content}} objects, got {_show(v)}")
    out = []
    for i, m in enumerate(v):
        at = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _Bad(at, f"expected an object with 'role' and 'content', got {_show(m)}")
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name
        if role not in ROLES:
            raise _Bad(f"{at}.role", f"expected one of {', '.join(ROLES)}, got {_show(m.get('role'))}")
        if "content" not in m:
            raise _Bad(f"{at}.content", "missing: expected a string")
        out.append({"role": role, "content": _content(m["content"], f"{at}.content")})
    return _with_system(out, system)


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


def _params(defaults: SamplingParams, values: dict[str, Any], prefix: str, api: str = "cbgen") -> SamplingParams:
    """``defaults`` overridden by the sampling keys of ``values``; other keys are skipped."""
    vals: dict[str, Any] = {}
    given: dict[str, str] = {}  # canonical name -> key the user wrote, so errors name their key
    try:  # logprobs / top_logprobs differ by API (logprob_fields.py)
        lp_given, lp = resolve_logprobs(values, defaults, api)
    except LogprobFieldError as e:
        raise _Bad(prefix + e.field, e.what) from None
    if lp_given:
        vals["logprobs"] = lp
    for key, v in values.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS or v is None or name == "logprobs":
            continue
        if name in vals and vals[name] != v:
            raise _Bad(prefix + key, f"conflicts with '{prefix}{given[name]}'")
        if name == "stop" and not isinstance(v, (str, list)):
            raise _Bad(prefix + key, f"expected a string or a list of strings, got {_show(v)}")
        if name == "stop_token_ids" and not isinstance(v, list):
            raise _Bad(prefix + key, f"expected a list of token ids, got {_show(v)}")
        vals[name], given[name] = v, key
    try:
        return SamplingParams.from_mapping(defaults, vals)
    except (ValueError, TypeError) as e:
        m = _SP_ERROR.fullmatch(str(e))
        if m is None:
            raise _Bad(prefix + "params", str(e)) from None
        name = m["name"]
        got = _show(vals[name]) if name in vals else m["got"]
        raise _Bad(prefix + given.get(name, name), f"expected {m['expected']}, got {got}") from None


def _controls(values: dict, prefix: str, messages: list[dict[str, str]] | None) -> ChatTemplateControls | None:
    try:
        return parse_controls(values, prefix, messages)
    except ControlError as e:
        raise _Bad(e.field, e.what) from None


def _record_id(obj: dict[str, Any], key: str) -> str:
    v = obj[key]
    if isinstance(v, str) and v:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise _Bad(key, f"expected a non-empty string or an integer, got {_show(v)}")


def _no_run_settings(obj: dict, prefix: str) -> None:
    for key in sorted(obj.keys() & RUN_SETTINGS.keys()):
        raise _Bad(prefix + key, f"a setting of the whole run, not of one line (the option {RUN_SETTINGS[key]})")


def _check_keys(obj: dict, prefix: str, structural: Collection[str]) -> None:
    """Whole-run settings and likely misspellings of a sampling field among ``obj``'s keys are
    errors; every other key is ignored (a dataset's columns, OpenAI fields cbgen does not use)."""
    _no_run_settings(obj, prefix)
    for key in sorted(obj.keys() - set(structural) - KNOWN_SAMPLING - CONTROL_KEYS):
        # 0.88: one letter off a field (temprature, max_token, topk) but not a dataset column
        # that merely contains one (temperature_note 0.81, max_tokens_hint 0.80, top 0.86).
        close = [OTHER_NAMES[key]] if key in OTHER_NAMES else difflib.get_close_matches(key, KNOWN_SAMPLING, n=1,
                                                                                   cutoff=0.88)
        if close:
            raise _Bad(prefix + key, f"unknown field (did you mean '{close[0]}'?)")


def _cbgen(obj: dict, rid: str, line_no: int, defaults: SamplingParams, system: str | None,
           structured: StructuredOutputsParams | None = None) -> InputRecord:
    _check_keys(obj, "", CBGEN_KEYS)
    if "prompt" in obj and "messages" in obj:
        raise _Bad("messages", "give either 'prompt' or 'messages', not both")
    if "messages" in obj:
        kind, prompt, messages = "messages", None, _messages(obj["messages"], "messages", system)
    elif "prompt" in obj:
        kind, prompt, messages = "prompt", _text(obj["prompt"], "prompt"), None
    else:
        raise _Bad("prompt", "missing: expected 'prompt' (a string) or 'messages' (a list of {role, content})")
    extra = {"metadata": obj["metadata"]} if "metadata" in obj else {}
    return InputRecord(rid, line_no, kind, prompt, messages, _params(defaults, obj, ""), "cbgen", extra,
                       chat_controls=_controls(obj, "", messages),
                       structured=parse_structured(obj, "", structured, openai=False))


def _openai(obj: dict, rid: str, line_no: int, defaults: SamplingParams, system: str | None,
            structured: StructuredOutputsParams | None = None) -> InputRecord:
    if "custom_id" not in obj:
        raise _Bad("custom_id", "missing: an OpenAI Batch line needs a 'custom_id'")
    url = obj.get("url", "/v1/chat/completions")
    if url not in OPENAI_URLS:
        raise _Bad("url", f"expected one of {', '.join(OPENAI_URLS)}, got {_show(url)}")
    method = obj.get("method", "POST")
    if method != "POST":
        raise _Bad("method", f"expected \"POST\", got {_show(method)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Bad("body", f"expected an object with the request, got {_show(body)}")
    _no_run_settings(obj, "")   # beside the body, where nothing but the envelope's keys apply
    _check_keys(body, "body.", ("messages", "prompt", *CBGEN_FIELDS))
    need = OPENAI_URLS[url]
    if need not in body:
        raise _Bad(f"body.{need}", f"missing: {url} needs '{need}'")
    prompt = _text(body["prompt"], "body.prompt") if need == "prompt" else None
    messages = _messages(body["messages"], "body.messages", system) if need == "messages" else None
    extra = {"url": url, "method": method, "model": body.get("model")}
    api = "completions" if need == "prompt" else "chat"
    return InputRecord(rid, line_no, "openai", prompt, messages, _params(defaults, body, "body.", api), "openai", extra,
                       chat_controls=_controls(body, "body.", messages),
                       structured=parse_structured(body, "body.", structured, openai=True))


def default_id(source: str | None, line_no: int) -> str:
    """The id of a line that names none: ``"<source>:<line_no>"``."""
    return f"{source or DEFAULT_SOURCE}:{line_no}"


def _location(source: str | None, line_no: int, unit: str = "line") -> str:
    return f"{unit} {line_no}" if source is None else f"{source} {unit} {line_no}"


def _split_lead(line: str) -> tuple[str, str]:
    """(the leading whitespace with invisible characters removed, the rest of ``line``)."""
    lead = _LEADING.match(line).group()
    return "".join(c for c in lead if c not in INVISIBLE), line[len(lead):]


def parse_line(line: str, line_no: int, defaults: SamplingParams, *, system: str | None = None,
               source: str | None = None, problem: str | None = None,
               structured: StructuredOutputsParams | None = None) -> InputRecord | InputError | None:
    """Parse one line (terminator optional). Never raises for bad input: returns ``InputError``.

    ``None`` for a blank line. ``source`` names the input: it forms default ids
    (``"a.jsonl:7"``) and prefixes messages (``a.jsonl line 7``). ``problem``
    is the reader's verdict on the line's bytes (undecodable, binary): then the
    line is an ``InputError`` with field ``encoding``. Undecodable bytes that
    arrive as lone surrogates (``surrogateescape``) are one too. ``structured`` is
    the default output constraint (a line's own constraint fields replace it).
    """
    loc = _location(source, line_no)
    rid = default_id(source, line_no)
    try:
        if problem is not None:
            raise _Bad("encoding", problem)
        line = line.rstrip("\r\n")
        bad = invalid_message(line, "utf-8")
        if bad is not None:
            raise _Bad("encoding", bad)
        lead, body = _split_lead(line)
        if not body:
            return None
        if not body.startswith("{"):
            joined = re.search(f"\ufeff[\\s{INVISIBLE}{BIDI}]*{{", body)
            if joined:  # "text\ufeff{...}": a JSON line glued to the end of a file without a final newline
                raise _Bad("encoding", f"a byte-order mark at character {len(lead) + joined.start() + 1} starts "
                                       "a JSON object inside a text line (files joined without a newline?)")
            return InputRecord(rid, line_no, "text", None,
                               _with_system([{"role": "user", "content": lead + body}], system), defaults, "cbgen",
                               structured=structured)
        try:
            obj = json.loads(body)  # starts with "{", so a successful parse is a dict
        except json.JSONDecodeError as e:
            raise _Bad("json", f"invalid JSON: {e.msg.removesuffix(' at')} at column {len(line) - len(body) + e.colno}") from None
        except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting too deep
            raise _Bad("json", f"invalid JSON: {e}") from None
        key = "custom_id" if "custom_id" in obj else "id" if "id" in obj else None
        if key is not None:
            rid = _record_id(obj, key)  # before other checks, so errors carry the line's own id
        # The envelope has a body (or a custom_id without a prompt of its own); a "body" column
        # beside a prompt or messages is a dataset's, and such a line is cbgen's format.
        if ("body" in obj or "custom_id" in obj) and "prompt" not in obj and "messages" not in obj:
            return _openai(obj, rid, line_no, defaults, system, structured)
        return _cbgen(obj, rid, line_no, defaults, system, structured)
    except _Bad as b:
        where = "" if b.field in ("json", "encoding") else f"field '{b.field}': "
        return InputError(rid, line_no, b.field, f"{loc}: {where}{b.what}")


class LineParser:
    """``parse_line`` plus state across one run's inputs.

    ``sources`` names every input of the run (``reader.source_names``). An
    explicit id equal to ``"<source>:<n>"`` for one of them, other than the
    line's own default id, is an ``InputError`` (field ``id``): defaults are
    reserved, so no explicit id can take one before or after its line is read.
    Ids are unique in the output: a repeated id is an ``InputError`` naming
    both lines, whose own id is the line's default id (made unique if the
    same source is read twice), so it never shadows the first record's id
    (resume is by id). Records and errors whose id is in ``skip_ids``
    (already in the output) are counted in ``skipped`` and dropped; they
    still count as seen for duplicates.
    With ``shard`` (``--shard I/N``, ``cbgen.io.shard``) only ids of that shard
    are returned; every line is still parsed, so duplicates are found as in one run.
    """

    def __init__(self, defaults: SamplingParams, *, system: str | None = None,
                 skip_ids: Collection[str] = (), sources: Collection[str] = (), shard=None,
                 structured: StructuredOutputsParams | None = None) -> None:
        self.defaults, self.system, self.skip_ids, self.shard = defaults, system, skip_ids, shard
        self.structured = structured
        self.sources = set(sources)
        self.seen: dict[str, str] = {}  # id -> where it was first seen
        self.skipped = 0

    def _reserved(self, rid: str, source: str | None, unit: str = "line") -> str | None:
        """Where ``rid`` is the default id of a line (or row) of this run, else None."""
        name, sep, n = rid.rpartition(":")
        if sep and n.isdigit() and n.isascii() and n[0] != "0" and (
                name in self.sources or name == (source or DEFAULT_SOURCE)):
            return _location(name, int(n), unit)
        return None

    def __call__(self, line: str, line_no: int, source: str | None = None,
                 problem: str | None = None) -> InputRecord | InputError | None:
        r = parse_line(line, line_no, self.defaults, system=self.system, source=source, problem=problem,
                       structured=self.structured)
        return None if r is None else self.admit(r, line_no, source)

    def admit(self, r: InputRecord | InputError, line_no: int, source: str | None = None,
              unit: str = "line") -> InputRecord | InputError | None:
        """Reserved-id, duplicate-id and resume checks for a parsed item (``unit``:
        "line", or "row" for a table, whose default ids have the same form)."""
        loc, own = _location(source, line_no, unit), default_id(source, line_no)
        taken = self._reserved(r.id, source, unit) if r.id != own else None
        if taken is not None:
            message = r.message if isinstance(r, InputError) else (
                f"{loc}: field 'id': {_show(r.id)} is the default id of {taken} (ids SOURCE:LINE naming an "
                f"input {unit} are reserved for {unit}s without an id); choose another id")
            r = InputError(own, line_no, r.field if isinstance(r, InputError) else "id", message, r.extra)
        if r.id in self.seen:
            rid, k = own, 1
            while rid in self.seen:
                k += 1
                rid = f"{own}#{k}"
            r = InputError(rid, line_no, "id", f"{loc}: field 'id': duplicate id {_show(r.id)} "
                                               f"(first on {self.seen[r.id]})", r.extra)
        self.seen[r.id] = loc
        if self.shard is not None and not self.shard.owns(r.id):
            return None
        if r.id in self.skip_ids:
            self.skipped += 1
            return None
        return dataclasses.replace(r, location=loc) if isinstance(r, InputRecord) else r
