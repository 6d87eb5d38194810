"""Checks of command-line options that the config dataclasses cannot make alone, run before
the model loads so a bad option fails in milliseconds. No Typer: the CLI shows the messages."""

from __future__ import annotations

import os
import re

from ..config import EngineConfig

# The config field each option sets: a config ValueError names the field (cbgen/config.py),
# the user typed the option, so the message is shown with the option's name.
OPTION_OF = {
    "max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-batched-tokens",
    "kv_cache_gb": "--kv-cache-gb", "attention": "--attention", "num_scheduler_steps": "--num-scheduler-steps",
    "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
    "min_p": "--min-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed", "stop": "--stop",
    "n": "--samples", "dtype": "--dtype", "threads": "--threads", "impl": "--impl", "quantize": "--quantize",
}
_FIELD = re.compile(r"\b(%s)(?==| \()" % "|".join(sorted(OPTION_OF, key=len, reverse=True)))


def option_error(e: ValueError) -> str:
    """A config validation message with each field named as its option:
    ``max_num_batched_tokens=64 is invalid: expected >= max_num_seqs (128) ...`` becomes
    ``--max-batched-tokens=64 is invalid: expected >= --max-num-seqs (128) ...``."""
    return _FIELD.sub(lambda m: OPTION_OF[m.group(1)], str(e))


def output_problem(output: str, inputs: list[str]) -> str | None:
    """Why ``--output`` cannot be written, or None. One of the inputs is a problem too: opened
    for writing it would be truncated while it is read (the input lost, and the run exited 0)."""
    if os.path.isdir(output):
        return f"--output {output!r}: is a directory, expected a file"
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        return f"--output {output!r}: no such directory {parent!r}"
    if not os.access(parent, os.W_OK) or (os.path.exists(output) and not os.access(output, os.W_OK)):
        return f"--output {output!r}: not writable"
    for path in inputs:
        if path != "-" and os.path.exists(output) and os.path.exists(path) and os.path.samefile(path, output):
            return (f"--output {output!r} is the input {path!r}: it would be overwritten while it is read; "
                    "write to another file")
    return None


def kv_tokens(loaded, cfg: EngineConfig) -> int | None:
    """The KV pool's size in tokens the engine would get for ``loaded`` under ``cfg`` (as
    ``Engine.__init__`` sizes it), or None for a model without the paged pool."""
    spec = loaded.spec
    if spec is None or not getattr(spec, "kv_pool", False):
        return None
    from ..engine.runner import num_blocks_for
    max_len = min(spec.max_model_len, cfg.max_model_len or spec.max_model_len)
    return num_blocks_for(cfg, spec, max_len) * cfg.block_size
