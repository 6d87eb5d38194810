"""Inputs (records, reader), outputs (writer) and resume. No torch here."""

from cbgen.io.reader import Line, Prefetcher, binary_reason, iter_lines, read_records, source_names
from cbgen.io.records import InputError, InputRecord, LineParser, default_id, parse_line
from cbgen.io.resume import ResumeError, ResumeState, compact, load_done_ids, open_for_append
from cbgen.io.writer import (JsonlWriter, OpenAIWriter, OutputClosed, ReorderBuffer, ResultRecord, TextWriter,
                             Writer, error_result, make_writer, result_from_outputs)

__all__ = [
    "Line", "Prefetcher", "binary_reason", "iter_lines", "read_records", "source_names",
    "InputError", "InputRecord", "LineParser", "default_id", "parse_line",
    "ResumeError", "ResumeState", "compact", "load_done_ids", "open_for_append",
    "JsonlWriter", "OpenAIWriter", "OutputClosed", "ReorderBuffer", "ResultRecord", "TextWriter",
    "Writer", "error_result", "make_writer", "result_from_outputs",
]
