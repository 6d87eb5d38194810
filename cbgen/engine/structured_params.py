"""StructuredOutputsParams: what a request's output must match. No library, no torch.

The spec is plain data so it can cross from the input parsers to the engine
and be hashed: the engine compiles each distinct spec once per run
(``structured.GrammarCache``). Names follow vLLM's ``StructuredOutputsParams``
and OpenAI's ``response_format``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# kind -> what ``spec`` holds
KINDS = {
    "json_object": "ignored (any JSON object)",
    "json_schema": "the schema as compact JSON text (key order kept: it orders the output)",
    "regex": "the regular expression (Rust regex syntax)",
    "choice": "a JSON list of the allowed strings",
    "grammar": "a Lark grammar, or GBNF (llama.cpp's EBNF)",
}
JSON_KINDS = frozenset({"json_object", "json_schema"})


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint. ``spec`` is normalised text (compact JSON for schemas), so
    equal constraints compare and hash equal whatever spacing, name or field the input used.
    Key order is kept: a schema's property order is the output's field order."""

    kind: str
    spec: str = ""
    # Not part of equality: they do not change the grammar (one compile serves all).
    name: str | None = field(default=None, compare=False)   # json_schema's ``name``, reported in records
    field: str = field(default="response_format", compare=False)  # the input field, for error messages

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is invalid: expected one of {', '.join(KINDS)}")

    @property
    def is_json(self) -> bool:
        """The output is a JSON value: records carry ``parsed``."""
        return self.kind in JSON_KINDS

    @classmethod
    def json_schema(cls, schema: Any, name: str | None = None, field: str = "response_format"
                    ) -> "StructuredOutputsParams":
        """``schema``: a JSON object (dict) or a boolean schema. ValueError if it is neither."""
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"expected a JSON schema object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), name, field)

    @classmethod
    def json_object(cls, field: str = "response_format") -> "StructuredOutputsParams":
        return cls("json_object", "", None, field)

    @classmethod
    def choice(cls, options: list[str], field: str = "choice") -> "StructuredOutputsParams":
        """ValueError unless ``options`` is a non-empty list of non-empty strings."""
        if not (isinstance(options, list) and options and all(isinstance(o, str) and o for o in options)):
            raise ValueError("expected a non-empty list of non-empty strings")
        return cls("choice", json.dumps(options, ensure_ascii=False), None, field)

    def describe(self) -> dict[str, Any]:
        """What records report: ``{"type": kind, "name": ...}`` (name only for a named schema)."""
        d: dict[str, Any] = {"type": self.kind}
        if self.name:
            d["name"] = self.name
        return d
