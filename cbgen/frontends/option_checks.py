"""Checks of command-line options that the config dataclasses cannot make alone, run before
the model loads so a bad option fails in milliseconds. No Typer: the CLI shows the messages."""

from __future__ import annotations

import os
import re

from ..config import OPTION_OF, EngineConfig

# A config ValueError names the field (cbgen/config.py); the user typed the option, so the
# message is shown with the option's name.
_FIELD = re.compile(r"\b(%s)(?==| \()" % "|".join(sorted(OPTION_OF, key=len, reverse=True)))


def option_error(e: ValueError) -> str:
    """A config validation message with each field named as its option:
    ``max_num_batched_tokens=64 is invalid: expected >= max_num_seqs (128) ...`` becomes
    ``--max-batched-tokens=64 is invalid: expected >= --max-num-seqs (128) ...``."""
    return _FIELD.sub(lambda m: OPTION_OF[m.group(1)], str(e))


def output_problem(output: str, inputs: list[str], reads: list[str | None] = ()) -> str | None:
    """Why ``--output`` cannot be written, or None. A file the run reads is a problem too:
    opened for writing it would be truncated while it is read (the input lost, and the run
    exited 0). ``inputs``: the positional inputs ("-": stdin, checked by its file); ``reads``:
    other files the run reads (``--chat-template``, ``--json-schema``, ``--grammar``, the
    model file), None where not given. A table output owns ``OUT.parts`` (table_parts.py) and
    empties it at the start, so an input inside it, or a file of that name, is a problem."""
    if os.path.isdir(output) or output.endswith(os.sep):
        return f"--output {output!r}: is a directory, expected a file"
    if os.path.exists(output):
        if not os.access(output, os.W_OK):
            return f"--output {output!r}: not writable"
    else:
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            return f"--output {output!r}: no such directory {parent!r}"
        if not os.access(parent, os.W_OK):
            return f"--output {output!r}: not writable (directory {parent!r})"
    out = os.path.abspath(output)
    for path in [*inputs, *(r for r in reads if r)]:
        if path == "-":
            same = os.path.exists(output) and _same_file(os.fstat(0), os.stat(output))
        else:
            same = os.path.exists(output) and os.path.exists(path) and os.path.samefile(path, output)
            if not same and os.path.isdir(path):   # a datasets directory: its files are read too
                same = out.startswith(os.path.abspath(path) + os.sep)
        if same:
            what = "stdin" if path == "-" else repr(path)
            return (f"--output {output!r} is read by this run ({what}): it would be overwritten while it is read; "
                    "write to another file")
    parts = out + ".parts"
    if os.path.exists(parts) and not os.path.isdir(parts):
        return f"--output {output!r}: {parts!r} is a file; a table output keeps its parts in that directory"
    for path in inputs:
        if path != "-" and (os.path.abspath(path) + os.sep).startswith(parts + os.sep):
            return (f"--output {output!r}: the input {path!r} is in {parts!r}, which a table output empties "
                    "when it starts; write to another file")
    return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def kv_tokens(loaded, cfg: EngineConfig) -> int | None:
    """The KV pool's size in tokens the engine would get for ``loaded`` under ``cfg`` (as
    ``Engine.__init__`` sizes it), or None for a model without the paged pool."""
    spec = loaded.spec
    if spec is None or not getattr(spec, "kv_pool", False):
        return None
    from ..engine.runner import max_len_for, num_blocks_for
    return num_blocks_for(cfg, spec, max_len_for(cfg, spec)) * cfg.block_size
