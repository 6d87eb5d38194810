"""Logprobs as the output formats show them (from the engine's ``PositionLogprobs``).

* cbgen JSONL: one object per token, ``{token, token_id, logprob, rank, bytes,
  top_logprobs: [{token, token_id, logprob, bytes}]}`` (OpenAI chat's entry plus
  ids and the rank, as vLLM reports it); prompt logprobs the same, ``null`` first.
* OpenAI chat: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}``.
* OpenAI legacy completions: ``{tokens, token_logprobs, top_logprobs: [{token:
  logprob}], text_offset}``; each dict holds the top k and the chosen token (so up
  to k + 1 keys, as OpenAI documents), and ``text_offset`` counts characters of
  the returned text (vLLM's convention without ``echo``).
* vLLM's ``prompt_logprobs`` in OpenAI output: ``[null, {"<token_id>": {logprob,
  rank, decoded_token}}, ...]`` holding the prompt token and its top k.

JSON has no infinity: a logprob of -inf (a token the model can never produce)
is written as -9999.0, as vLLM does.
"""

from __future__ import annotations

from typing import Any

from cbgen.engine.outputs import Logprob, PositionLogprobs

FLOOR = -9999.0


def _lp(v: float) -> float:
    return max(v, FLOOR)


def _bytes(t: Logprob) -> list[int]:
    return list(t.bytes)


def _jsonl_entry(p: PositionLogprobs) -> dict[str, Any]:
    c = p.chosen
    return {"token": c.token, "token_id": c.token_id, "logprob": _lp(c.logprob), "rank": c.rank,
            "bytes": _bytes(c), "top_logprobs": [{"token": t.token, "token_id": t.token_id,
                                                  "logprob": _lp(t.logprob), "bytes": _bytes(t)} for t in p.top]}


def jsonl_logprobs(entries: list[PositionLogprobs | None] | None) -> list[dict | None] | None:
    """The cbgen JSONL form of generated-token or prompt logprobs (None stays None)."""
    if entries is None:
        return None
    return [None if p is None else _jsonl_entry(p) for p in entries]


def jsonl_choices(choices: list[dict] | None) -> list[dict] | None:
    """``ResultRecord.choices`` with each sample's logprobs in the JSONL form."""
    if choices is None:
        return None
    return [{**c, "logprobs": jsonl_logprobs(c["logprobs"])} if "logprobs" in c else c for c in choices]


def chat_logprobs(entries: list[PositionLogprobs] | None) -> dict | None:
    """OpenAI chat.completion ``choices[i].logprobs``."""
    if entries is None:
        return None
    content = [{"token": p.chosen.token, "logprob": _lp(p.chosen.logprob), "bytes": _bytes(p.chosen),
                "top_logprobs": [{"token": t.token, "logprob": _lp(t.logprob), "bytes": _bytes(t)} for t in p.top]}
               for p in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[PositionLogprobs] | None) -> dict | None:
    """OpenAI text_completion ``choices[i].logprobs`` (the legacy form)."""
    if entries is None:
        return None
    top = []
    for p in entries:
        d = {t.token: _lp(t.logprob) for t in p.top}
        d.setdefault(p.chosen.token, _lp(p.chosen.logprob))
        top.append(d)
    return {"tokens": [p.chosen.token for p in entries],
            "token_logprobs": [_lp(p.chosen.logprob) for p in entries],
            "top_logprobs": top,
            "text_offset": [p.text_offset for p in entries]}


def vllm_prompt_logprobs(entries: list[PositionLogprobs | None] | None) -> list[dict | None] | None:
    """vLLM's ``prompt_logprobs`` in its OpenAI-compatible responses."""
    if entries is None:
        return None
    out: list[dict | None] = []
    for p in entries:
        if p is None:
            out.append(None)
            continue
        d = {str(t.token_id): {"logprob": _lp(t.logprob), "rank": i + 1, "decoded_token": t.token}
             for i, t in enumerate(p.top)}
        d.setdefault(str(p.chosen.token_id), {"logprob": _lp(p.chosen.logprob), "rank": p.chosen.rank,
                                              "decoded_token": p.chosen.token})
        out.append(d)
    return out
