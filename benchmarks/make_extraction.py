"""Turn dev prompts into extraction lines with a per-line JSON schema (cbgen run input).

    python benchmarks/make_extraction.py ../shared/bench/prompts-dev.jsonl -k 64 > extraction.jsonl
    cbgen run extraction.jsonl -n 96 -o out.jsonl

Each line asks for ``{title, sentiment: positive|neutral|negative, keywords: [<= 5 strings]}``
about one prompt, and carries that schema as an OpenAI-style ``response_format``
(one schema shared by all lines, so a run compiles it once). The e2e test
(tests/test_structured_e2e.py) and structured_speed.py use ``extraction_lines``.
"""

from __future__ import annotations

import argparse
import json
import sys

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
    },
    "required": ["title", "sentiment", "keywords"],
    "additionalProperties": False,
}
INSTRUCTION = ("Read the request below. Return JSON with a short title for it, its sentiment "
               "(positive, neutral or negative) and up to 5 keywords.\n\nRequest: {text}")


def prompt_text(obj: dict) -> str:
    """The user text of a dev-prompt line (``messages``' last user turn, or ``prompt``)."""
    if "messages" in obj:
        return next(m["content"] for m in reversed(obj["messages"]) if m["role"] == "user")
    return obj["prompt"]


def extraction_lines(path: str, k: int = 64, schema: dict | None = None) -> list[dict]:
    """The first ``k`` prompts of the JSONL file ``path`` as extraction lines (dicts)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) == k:
                break
            if not line.strip():
                continue
            obj = json.loads(line)
            rid = obj.get("id", str(len(out) + 1))
            out.append({"id": f"extract-{rid}",
                        "messages": [{"role": "user", "content": INSTRUCTION.format(text=prompt_text(obj))}],
                        "response_format": {"type": "json_schema", "json_schema": {
                            "name": "extraction", "schema": schema or SCHEMA, "strict": True}}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prompts", help="dev prompt JSONL (e.g. ../shared/bench/prompts-dev.jsonl)")
    ap.add_argument("-k", type=int, default=64, help="number of lines (default 64)")
    args = ap.parse_args()
    for line in extraction_lines(args.prompts, args.k):
        sys.stdout.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
