"""Inputs (records, reader), outputs (writer) and resume. No torch here."""

from cbgen.io.reader import Line, Prefetcher, iter_lines, read_records
from cbgen.io.records import InputError, InputRecord, LineParser, parse_line
from cbgen.io.resume import ResumeError, ResumeState, load_done_ids, open_for_append
from cbgen.io.writer import (JsonlWriter, OpenAIWriter, OutputClosed, ReorderBuffer, ResultRecord, TextWriter,
                             Writer, error_result, make_writer, result_from_outputs)

__all__ = [
    "Line", "Prefetcher", "iter_lines", "read_records",
    "InputError", "InputRecord", "LineParser", "parse_line",
    "ResumeError", "ResumeState", "load_done_ids", "open_for_append",
    "JsonlWriter", "OpenAIWriter", "OutputClosed", "ReorderBuffer", "ResultRecord", "TextWriter",
    "Writer", "error_result", "make_writer", "result_from_outputs",
]
