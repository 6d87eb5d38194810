"""``cbgen run --validate``: parse every line, apply templates, check lengths; generate nothing."""

from __future__ import annotations

from rich.console import Console

from ..config import SamplingParams
from ..io.reader import source_names
from ..io.records import InputError, LineParser
from ..io.table_rows import TableSpec, read_inputs
from .prompting import PromptError, encode


def validate_inputs(inputs: list[str], loaded, defaults: SamplingParams, system: str | None, err: Console,
                    spec: TableSpec | None = None) -> int:
    """Prints one line per problem and a summary to ``err``; returns the exit code (1 if any problem)."""
    ok = bad = 0
    max_len = loaded.max_model_len
    for item in read_inputs(inputs, LineParser(defaults, system=system, sources=source_names(inputs)), spec):
        if isinstance(item, InputError):
            problem = item.message
        else:
            try:
                n = len(encode(loaded.tokenizer, prompt=item.prompt, messages=item.messages))
                problem = (None if n < max_len else
                           f"line {item.line_no}: prompt: {n} tokens leave no room to generate within "
                           f"the context length of {max_len} tokens")
            except PromptError as e:
                problem = f"line {item.line_no}: {e}"
        if problem:
            bad += 1
            err.print(f"invalid: {problem}", highlight=False, soft_wrap=True)
        else:
            ok += 1
    err.print(f"validate: {ok} valid, {bad} invalid", highlight=False)
    return 1 if bad else 0
