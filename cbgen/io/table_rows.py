"""Table rows -> ``InputRecord`` | ``InputError``, and one input stream over line files and tables.

How a row becomes a prompt (``TableSpec``; exactly one applies per table):

* ``template``: the rendered text is one user turn, like a plain-text line
  (chat template applied, ``--system`` added);
* ``prompt_column``: the cell is a raw completion prompt, like ``{"prompt": ...}``
  (no chat template);
* ``messages_column``: the cell is a chat, a list of ``{role, content}``
  structs or its JSON text, like ``{"messages": [...]}``;
* none of them: a ``messages`` column if the table has one, else a ``prompt``
  column, else the table is refused up front.

The id is the ``id_column`` cell (a string or an integer), else the row number
(``"7"``, or ``"data.csv:7"`` when several inputs are read). Sampling
parameters come from the command line only: columns are never read as
parameters (a ``temperature`` column in a weather table is data).

Every item carries its ``TableRow`` (source and cells) in ``extra["row"]`` so a
table output can write the input columns next to the result.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from cbgen.io.reader import source_lines, source_names
from cbgen.io.records import (InputError, InputRecord, LineParser, _Bad, _location, _messages, _record_id,
                              _show, _with_system, default_id)
from cbgen.io.tables import Row, iter_rows, read_schema, table_kind
from cbgen.io.templates import PromptTemplate, TemplateRowError


class TableSpecError(ValueError):
    """The options do not fit a table (a missing column); one line naming the file and column."""


@dataclass(frozen=True)
class TableRow:
    """Where an input came from, for table outputs: its source label and its cells."""

    source: str | None                 # the input path when several inputs are read, else None
    columns: dict[str, Any]            # column -> value; {} for a line input


@dataclass(frozen=True)
class TableSpec:
    template: PromptTemplate | None = None
    prompt_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None

    def __post_init__(self) -> None:
        given = [n for n, v in (("--template", self.template), ("--prompt-column", self.prompt_column),
                                ("--messages-column", self.messages_column)) if v is not None]
        if len(given) > 1:
            raise TableSpecError(f"{' and '.join(given)}: give only one way to build the prompt")

    @property
    def given(self) -> bool:
        """Any table option was given (they are refused when no input is a table)."""
        return any(v is not None for v in (self.template, self.prompt_column, self.messages_column,
                                           self.id_column))

    def resolve(self, path: str, names: list[str]) -> "TableSpec":
        """This spec for a table with columns ``names``: the default prompt column
        filled in, every column it reads checked. Raises ``TableSpecError``."""
        spec = self
        if self.template is None and self.prompt_column is None and self.messages_column is None:
            col = next((c for c in ("messages", "prompt") if c in names), None)
            if col is None:
                raise TableSpecError(f"{path}: no prompt: give --template, --prompt-column or --messages-column "
                                     f"(columns: {', '.join(names)})")
            spec = dataclasses.replace(self, **{f"{col}_column": col})
        wanted = [(f"--{k.replace('_', '-')}", getattr(spec, k))
                  for k in ("prompt_column", "messages_column", "id_column")]
        wanted += [("--template placeholder", c) for c in (spec.template.columns if spec.template else ())]
        for opt, col in wanted:
            if col is not None and col not in names:
                raise TableSpecError(f"{path}: {opt} {col!r}: no such column (columns: {', '.join(names)})")
        return spec


class RowParser:
    """Rows of table inputs -> items, sharing one ``LineParser``'s id checks and resume skips."""

    def __init__(self, spec: TableSpec, lines: LineParser) -> None:
        self.spec, self.lines = spec, lines

    def _record(self, spec: TableSpec, values: dict[str, Any], rid: str, row_no: int, row: TableRow) -> InputRecord:
        system = self.lines.system
        if spec.template is not None:
            try:
                text = spec.template.render(values)
            except TemplateRowError as e:
                raise _Bad(e.field, str(e)) from None
            kind, prompt, messages = "text", None, _with_system([{"role": "user", "content": text}], system)
        elif spec.prompt_column is not None:
            kind, messages = "prompt", None
            prompt = values[spec.prompt_column]
            if not isinstance(prompt, str):
                raise _Bad(spec.prompt_column, f"expected a string, got {_show(prompt)}")
        else:
            col, kind, prompt = spec.messages_column, "messages", None
            v = values[col]
            if isinstance(v, str):  # CSV cells hold the chat as JSON text
                try:
                    v = json.loads(v)
                except ValueError as e:
                    raise _Bad(col, f"invalid JSON: {e}") from None
            messages = _messages(v, col, system)
        return InputRecord(rid, row_no, kind, prompt, messages, self.lines.defaults, "cbgen", {"row": row},
                           structured=self.lines.structured)   # --json / --regex ... apply to rows too

    def parse(self, spec: TableSpec, r: Row, source: str | None) -> InputRecord | InputError:
        """One row -> item (never raises for bad data)."""
        loc = _location(source, r.row_no, "row")
        rid = default_id(source, r.row_no)
        row = TableRow(source, r.values or {})
        if r.problem is not None:
            return InputError(rid, r.row_no, "row", f"{loc}: {r.problem}", {"row": row})
        try:
            if spec.id_column is not None:
                rid = _record_id(r.values, spec.id_column)
            return self._record(spec, r.values, rid, r.row_no, row)
        except _Bad as b:
            msg = b.what if b.what.startswith(("column '", "placeholder", "template")) else \
                f"column '{b.field}': {b.what}"
            return InputError(rid, r.row_no, b.field, f"{loc}: {msg}", {"row": row})

    def read(self, path: str, source: str | None) -> Iterator[InputRecord | InputError]:
        spec = self.spec.resolve(path, read_schema(path).names)
        for r in iter_rows(path):
            item = self.lines.admit(self.parse(spec, r, source), r.row_no, source, unit="row")
            if item is not None:
                yield item


def read_inputs(sources: list[str], lines: LineParser, spec: TableSpec | None = None,
                stdin: BinaryIO | None = None) -> Iterator[InputRecord | InputError]:
    """Items of every source in order: tables row by row, other files and ``-`` line by line.

    Default ids are ``"<source>:<line or row>"`` (``records.default_id``). Line items
    get an empty ``TableRow`` too, so a table output knows their source.
    """
    rows = RowParser(spec or TableSpec(), lines)
    for src, label in zip(sources, source_names(sources)):
        if table_kind(src) is not None:
            yield from rows.read(src, label)
            continue
        for ln in source_lines(src, label, stdin):
            r = lines(ln.text, ln.line_no, ln.source, problem=ln.problem)
            if r is not None:
                yield dataclasses.replace(r, extra={**r.extra, "row": TableRow(label, {})})
