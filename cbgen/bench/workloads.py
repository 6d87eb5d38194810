"""Benchmark workloads: token-id prompts plus how far to generate. No torch.

Every system in one comparison gets the same ``Workload``: the same prompt ids
(chat template applied once, here), the same ``max_new_tokens`` and the same
EOS rule, greedy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..config import SamplingParams
from ..frontends.prompting import PromptError, encode
from ..io.reader import iter_lines
from ..io.records import InputError, parse_line

DEFAULT_PROMPTS = "../shared/bench/prompts-dev.jsonl"   # relative to the repo root


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    max_new_tokens: int
    ignore_eos: bool              # True: every request generates exactly max_new_tokens

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def load_prompts(path: str | Path, tokenizer, limit: int | None = None) -> list[tuple[str, list[int]]]:
    """(id, token ids) of the first ``limit`` prompts of a prompt file, read and encoded
    exactly as ``cbgen run`` reads its input (any format it takes; ``messages`` get the
    chat template). A bad line is a ValueError naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} not found (pass --prompts FILE; the default "
                                f"{DEFAULT_PROMPTS!r} is relative to the repo root)")
    out: list[tuple[str, list[int]]] = []
    for line in iter_lines([str(path)]):
        if limit is not None and len(out) >= limit:
            break
        rec = parse_line(line.text, line.line_no, SamplingParams(), source=str(path), problem=line.problem)
        if isinstance(rec, InputError):
            raise ValueError(rec.message)
        if rec is None:
            continue
        try:
            out.append((rec.id, encode(tokenizer, prompt=rec.prompt, messages=rec.messages)))
        except PromptError as e:
            raise ValueError(f"{path} line {rec.line_no}: {e}") from None
    if not out:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return out


def load_prompt_ids(path: str | Path, tokenizer, limit: int | None = None) -> list[list[int]]:
    """Token ids only, as the workloads take them (see ``load_prompts``)."""
    return [ids for _, ids in load_prompts(path, tokenizer, limit)]


def _cycle(prompts: list[list[int]], n: int) -> list[list[int]]:
    """``n`` prompts, repeating the list when it is shorter than ``n``."""
    return [prompts[i % len(prompts)] for i in range(n)]


def uniform(prompts: list[list[int]], n: int, m: int) -> Workload:
    """``n`` prompts x exactly ``m`` new tokens each (EOS ignored)."""
    return Workload("uniform", _cycle(prompts, n), m, ignore_eos=True)


def real(prompts: list[list[int]], n: int, max_new_tokens: int) -> Workload:
    """The first ``n`` prompts (all of them if fewer: repeats would be prefix-cache hits for
    cbgen only), natural EOS, at most ``max_new_tokens``."""
    return Workload("real", prompts[:n], max_new_tokens, ignore_eos=False)


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds from the start) of ``n`` requests arriving at ``rate``/s."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
