"""``cbgen run --validate``: parse every line, apply templates, check lengths; generate nothing.

``check_inputs`` is the shared pass: ``--validate`` prints its problems and a
count; ``--dry-run`` (``dryrun.py``) also uses its token counts and sample.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Callable

from rich.console import Console

from ..config import SamplingParams
from ..io.reader import source_names
from ..io.records import InputError, LineParser
from ..io.table_rows import TableSpec, read_inputs
from .prompting import PromptError, encode


@dataclass(frozen=True)
class CheckedPrompt:
    """A valid input, encoded: what the run would submit."""
    id: str
    line_no: int
    num_prompt_tokens: int
    params: SamplingParams
    token_ids: list[int] | None = None   # kept only for the sample


@dataclass
class InputCheck:
    """Everything ``check_inputs`` learnt. Memory is O(sample + longest), not O(inputs), except
    ``prompt_tokens`` / ``max_new_tokens`` (two ints per valid input)."""
    num_valid: int = 0
    num_invalid: int = 0
    prompt_tokens: list[int] = field(default_factory=list)   # per valid input, in input order
    max_new_tokens: list[int] = field(default_factory=list)  # per valid input: the limit within the context
    num_samples: list[int] = field(default_factory=list)     # per valid input: n
    longest: list[CheckedPrompt] = field(default_factory=list)  # the longest prompts, longest first
    sample: list[CheckedPrompt] = field(default_factory=list)   # uniform random sample (seeded), with token ids


def check_inputs(inputs: list[str], tokenizer, max_len: int, defaults: SamplingParams, system: str | None,
                 on_problem: Callable[[str], None], *, sample_size: int = 0, num_longest: int = 5,
                 seed: int = 0, spec: TableSpec | None = None, kv_tokens: int | None = None) -> InputCheck:
    """Parse and encode every line as ``cbgen run`` would; ``on_problem`` gets each problem as one line.
    ``kv_tokens``: the KV pool's size in tokens; a prompt that fills it is a problem, as the
    engine refuses it (``Engine.add_request``).

    ``sample`` is a reservoir sample (Vitter's algorithm R) of ``sample_size``
    valid inputs with their token ids, in random order, the same for the same input and seed.
    """
    check = InputCheck()
    rng = random.Random(seed)
    longest: list[tuple[int, int, CheckedPrompt]] = []   # min-heap of (tokens, -index, prompt)
    for item in read_inputs(inputs, LineParser(defaults, system=system, sources=source_names(inputs)), spec):
        if isinstance(item, InputError):
            problem, ids = item.message, None
        else:
            try:
                ids = encode(tokenizer, prompt=item.prompt, messages=item.messages, controls=item.chat_controls)
                problem = (f"{item.where}: prompt: {len(ids)} tokens leave no room to generate within "
                           f"the context length of {max_len} tokens" if len(ids) >= max_len else
                           f"{item.where}: prompt: {len(ids)} tokens leave no room to generate in the KV cache "
                           f"of {kv_tokens} tokens (raise --kv-cache-gb)" if kv_tokens and len(ids) >= kv_tokens
                           else None)
            except PromptError as e:
                problem = f"{item.where}: {e}"
        if problem:
            check.num_invalid += 1
            on_problem(problem)
            continue
        i, n = check.num_valid, len(ids)
        check.num_valid += 1
        check.prompt_tokens.append(n)
        check.max_new_tokens.append(min(item.params.max_new_tokens, max_len - n))
        check.num_samples.append(item.params.n)
        entry = CheckedPrompt(item.id, item.line_no, n, item.params)
        heapq.heappush(longest, (n, -i, entry))
        if len(longest) > num_longest:
            heapq.heappop(longest)
        if sample_size:
            j = i if i < sample_size else rng.randrange(i + 1)
            if j < sample_size:
                sampled = CheckedPrompt(item.id, item.line_no, n, item.params, ids)
                if i < sample_size:
                    check.sample.append(sampled)
                else:
                    check.sample[j] = sampled
    rng.shuffle(check.sample)
    check.longest = [e for _, _, e in sorted(longest, reverse=True)]
    return check


def validate_inputs(inputs: list[str], loaded, defaults: SamplingParams, system: str | None, err: Console,
                    spec: TableSpec | None = None, kv_tokens: int | None = None) -> int:
    """Prints one line per problem and a summary to ``err``; returns the exit code (1 if any problem).
    ``kv_tokens``: as ``check_inputs``."""
    check = check_inputs(inputs, loaded.tokenizer, loaded.max_model_len, defaults, system,
                         lambda p: err.print(f"invalid: {p}", highlight=False, soft_wrap=True), spec=spec,
                         kv_tokens=kv_tokens)
    err.print(f"validate: {check.num_valid} valid, {check.num_invalid} invalid", highlight=False)
    return 1 if check.num_invalid else 0
