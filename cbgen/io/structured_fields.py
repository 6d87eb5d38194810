"""Input fields that constrain the output -> ``StructuredOutputsParams``.

Per line (the line's constraint replaces the command-line default):

* ``response_format`` (cbgen lines, and ``body.response_format`` in the OpenAI
  envelope): ``{"type": "text"}`` (no constraint, even with a CLI default),
  ``{"type": "json_object"}``, or ``{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}`` (OpenAI's shapes; ``strict`` is accepted and
  always on: the output always matches the schema).
* cbgen lines only: ``regex`` (a string), ``choice`` (a list of strings),
  ``grammar`` (Lark, or llama.cpp's GBNF).

At most one of them per line. Only the shape is checked here; the constraint
library checks the schema / regex / grammar itself when the engine compiles it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..engine.structured_params import StructuredOutputsParams
from .field_error import FieldError
from .field_error import show as _show

CBGEN_FIELDS = ("response_format", "regex", "choice", "grammar")
OPENAI_FIELDS = ("response_format",)


def _response_format(v: Any, at: str) -> StructuredOutputsParams | None:
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise FieldError(at, f"expected an object with 'type' (text, json_object or json_schema), got {_show(v)}")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams.json_object(field=at)
    if kind != "json_schema":
        raise FieldError(f"{at}.type", f"expected text, json_object or json_schema, got {_show(kind)}")
    js = v.get("json_schema")
    if not isinstance(js, dict):
        raise FieldError(f"{at}.json_schema", f"expected an object with 'name' and 'schema', got {_show(js)}")
    if "schema" not in js:
        raise FieldError(f"{at}.json_schema.schema", "missing: expected a JSON schema object")
    name = js.get("name")
    if name is not None and not isinstance(name, str):
        raise FieldError(f"{at}.json_schema.name", f"expected a string, got {_show(name)}")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise FieldError(f"{at}.json_schema.strict", f"expected true or false, got {_show(strict)}")
    try:
        return StructuredOutputsParams.json_schema(js["schema"], name, field=f"{at}.json_schema.schema")
    except ValueError as e:
        raise FieldError(f"{at}.json_schema.schema", f"{e}, got {_show(js['schema'])}") from None


def parse_structured(values: dict[str, Any], prefix: str, default: StructuredOutputsParams | None,
                     openai: bool = False) -> StructuredOutputsParams | None:
    """The constraint of one line (``values``: the line object, or the OpenAI ``body``).

    ``prefix`` is prepended to field names in errors (``"body."``). Raises
    ``FieldError`` for a wrong shape or two constraint fields on one line."""
    names = OPENAI_FIELDS if openai else CBGEN_FIELDS
    given = [k for k in names if values.get(k) is not None]
    if not given:
        return default
    if len(given) > 1:
        raise FieldError(prefix + given[1], f"conflicts with '{prefix}{given[0]}' (give one constraint per line)")
    key = given[0]
    v, at = values[key], prefix + key
    if key == "response_format":
        return _response_format(v, at)
    if key == "choice":
        try:
            return StructuredOutputsParams.choice(v, field=at)
        except ValueError as e:
            raise FieldError(at, f"{e}, got {_show(v)}") from None
    if not isinstance(v, str) or not v:
        raise FieldError(at, f"expected a non-empty string, got {_show(v)}")
    return StructuredOutputsParams(key, v, None, at)


def from_options(json_mode: bool = False, json_schema: str | None = None, regex: str | None = None,
                 choice: str | None = None, grammar: str | None = None) -> StructuredOutputsParams | None:
    """The command-line default constraint (``--json``, ``--json-schema FILE``,
    ``--regex``, ``--choice a,b,c``, ``--grammar FILE``); ValueError naming the
    option for two of them, an unreadable file or a file that is not a JSON schema."""
    given = [name for name, v in (("--json", json_mode), ("--json-schema", json_schema), ("--regex", regex),
                                  ("--choice", choice), ("--grammar", grammar)) if v is not None and v is not False]
    if len(given) > 1:
        raise ValueError(f"{given[0]} and {given[1]} cannot be combined (one constraint per line)")
    for name, v, what in (("--json-schema", json_schema, "a file"), ("--regex", regex, "a pattern"),
                          ("--grammar", grammar, "a file")):
        if v is not None and not v:   # '' from a shell variable that was empty: never "no constraint"
            raise ValueError(f"{name} '': expected {what}")
    if json_mode:
        return StructuredOutputsParams.json_object(field="--json")
    if json_schema:
        text = _read(json_schema, "--json-schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema {json_schema}: invalid JSON: {e.msg} at line {e.lineno} "
                             f"column {e.colno}") from None
        if isinstance(schema, dict) and schema.get("type") == "json_schema" and "json_schema" in schema:
            schema = schema["json_schema"].get("schema", schema)   # a whole response_format, as OpenAI writes it
        try:
            return StructuredOutputsParams.json_schema(schema, field="--json-schema")
        except ValueError as e:
            raise ValueError(f"--json-schema {json_schema}: {e}") from None
    if regex:
        return StructuredOutputsParams("regex", regex, None, "--regex")
    if choice is not None:
        options = [c.strip() for c in choice.split(",") if c.strip()]
        if not options:
            raise ValueError(f"--choice {choice!r}: expected a comma-separated list of labels")
        return StructuredOutputsParams.choice(options, field="--choice")
    if grammar:
        return StructuredOutputsParams("grammar", _read(grammar, "--grammar"), None, "--grammar")
    return None


def _read(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot read: {e.strerror or e}") from None
