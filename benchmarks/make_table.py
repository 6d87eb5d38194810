"""Build the 10,000-row Parquet table for the tables must-show (and tests): the dev
prompts expanded by a template.

Each row takes one prompt of ``prompts-dev.jsonl`` (its first user turn) and one of
~37 task variants, so the table is 271 x 37 rows cut to ``--rows``, in a fixed order.
Columns: ``id`` (string), ``question`` (string), ``task`` (string), ``variant`` (int64).

    python benchmarks/make_table.py --rows 10000 -o /tmp/table-10k.parquet
    cbgen run /tmp/table-10k.parquet --template "{task}: {question}" --id-column id -o out.parquet
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# The repo's sibling shared/ dir (as `cbgen bench` finds it), or the team's shared copy from a worktree.
DEV = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts-dev.jsonl",
                        Path("/work/shared/bench/prompts-dev.jsonl")) if p.exists()),
           Path("../shared/bench/prompts-dev.jsonl"))
TASKS = ["Answer briefly", "Answer in one sentence", "Explain to a child", "Give three bullet points on",
         "Summarize", "Rephrase", "Translate into French", "Write a haiku about", "List pros and cons of",
         "Give an example for", "Answer formally", "Answer casually", "Ask a follow-up question about",
         "Argue against", "Argue for", "Write a tweet about", "Give a title for", "Name the key terms in",
         "Write a limerick about", "Describe the history of", "Predict the future of", "Give a quiz on",
         "Explain like a pirate", "Give a one-word answer to", "Write a short story about",
         "Give the opposite view on", "Outline an essay on", "Give a metaphor for", "Critique",
         "Give a checklist for", "Explain the risks of", "Give a fun fact about", "Write a slogan for",
         "Compare two views on", "Explain to an expert", "Give a step-by-step plan for", "Answer in Spanish"]


def questions(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        if "messages" in obj:
            out.append(next(m["content"] for m in obj["messages"] if m["role"] == "user"))
        else:
            out.append(obj["prompt"])
    return out


def build(rows: int, path: str, dev: Path = DEV, row_group_rows: int = 1000) -> int:
    """Write ``rows`` rows to ``path``; returns the row count (at most 271 x 37)."""
    qs = questions(dev)
    pairs = [(v, q) for v in range(len(TASKS)) for q in range(len(qs))][:rows]
    table = pa.table({"id": [f"q{q}-v{v}" for v, q in pairs], "question": [qs[q] for _, q in pairs],
                      "task": [TASKS[v] for v, _ in pairs], "variant": pa.array([v for v, _ in pairs], pa.int64())})
    pq.write_table(table, path, row_group_size=row_group_rows)
    return table.num_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--dev", type=Path, default=DEV, help="the prompts JSONL (default: %(default)s)")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    n = build(a.rows, a.output, a.dev)
    print(f"wrote {n} rows to {a.output}")


if __name__ == "__main__":
    main()
