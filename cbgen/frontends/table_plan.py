"""``cbgen run`` with tables: the output format from ``-o``'s extension, and the
table options checked against every table input before the model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass

from typing import TYPE_CHECKING

from ..io.table_rows import TableSpec
from ..io.tables import TABLE_EXTS, read_schema, table_kind
from ..io.templates import PromptTemplate

if TYPE_CHECKING:  # pyarrow is imported only when a table is read or written (start-up time)
    from ..io.table_output import OutputLayout

TABLE_FMTS = set(TABLE_EXTS.values())  # an output is written in the format its extension reads as


@dataclass(frozen=True)
class TablePlan:
    spec: TableSpec                    # how rows become prompts
    layout: "OutputLayout | None"      # the output columns, for a table output
    part_rows: int                     # rows per row group / crash-safe part of a table output


def output_format(output: str | None, fmt: str) -> str:
    """``fmt``, or the table format ``-o`` names by its extension when ``fmt`` is the default
    (jsonl). Raises ``ValueError`` for a combination that cannot work."""
    ext_fmt = TABLE_EXTS.get(os.path.splitext(output or "")[1].lower())
    if ext_fmt is not None and fmt in ("jsonl", ext_fmt):
        return ext_fmt
    if ext_fmt is not None:
        raise ValueError(f"-o {output}: a {ext_fmt} file, but --format {fmt} writes lines; "
                         f"drop --format or use another file name")
    if fmt in TABLE_FMTS:
        raise ValueError(f"--format {fmt} needs -o FILE{'.' + fmt if fmt != 'parquet' else '.parquet'}")
    return fmt


def plan_tables(inputs: list[str], *, fmt: str, template: str | None = None, template_format: str = "auto",
                prompt_column: str | None = None, messages_column: str | None = None,
                id_column: str | None = None, samples: int = 1, part_rows: int = 1000) -> TablePlan:
    """Check the table options against each table input's columns (schemas only; no rows read).

    Raises ``ValueError`` (templates, options) or ``OSError`` (unreadable table), one line each.
    """
    if part_rows < 1:
        raise ValueError(f"--row-group-size {part_rows}: expected a positive number of rows")
    spec = TableSpec(PromptTemplate(template, template_format) if template is not None else None,
                     prompt_column, messages_column, id_column)
    for path in inputs:
        if path != "-" and os.path.isdir(path) and table_kind(path) is None:
            raise ValueError(f"input {path!r}: a directory, but not one saved by datasets' save_to_disk "
                             "(no dataset_info.json / state.json)")
    tables = [p for p in inputs if table_kind(p) is not None]
    if spec.given and not tables:
        raise ValueError("--template, --prompt-column, --messages-column and --id-column apply to table "
                         "inputs (.parquet, .csv, .tsv or a datasets directory); none was given")
    schemas = []
    for path in tables:
        schema = read_schema(path)
        spec.resolve(path, schema.names)
        schemas.append((path, schema))
    layout = None
    if fmt in TABLE_FMTS:
        from ..io.table_output import output_layout
        first = schemas[0] if schemas else None
        for path, schema in schemas[1:]:
            if not schema.equals(first[1]):
                raise ValueError(f"{path}: its columns differ from {first[0]}'s; a table output needs "
                                 "the same columns (names and types) in every table input")
        layout = output_layout(first[1] if first else None, multi=len(inputs) > 1, samples=samples)
    return TablePlan(spec, layout, part_rows)
