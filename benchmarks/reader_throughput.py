"""Input reading speed: cbgen's reader (encoding sniffing, chunked decoding, byte
offsets, parsing) against a bare baseline, in the same run.

The baseline is what the reader did before it learnt encodings: ``readline``
per line and a UTF-8 decode with ``surrogateescape``, then the same
``LineParser``. Both read one generated file (JSONL and text lines mixed, some
non-ASCII); the figures are lines per second, best of ``--repeats``.

    .venv/bin/python benchmarks/reader_throughput.py [--lines 200000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cbgen.config import SamplingParams
from cbgen.io.reader import iter_lines, read_records
from cbgen.io.records import LineParser


def make_input(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if i % 3 == 0:
                f.write(json.dumps({"id": f"r{i}", "prompt": f"Once upon a time, number {i}"}) + "\n")
            elif i % 3 == 1:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Grüße, café {i} 🎉"}]},
                                   ensure_ascii=False) + "\n")
            else:
                f.write(f"Tell me a story about the number {i}.\n")


def baseline_records(path: Path, parser: LineParser):
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline():
            n += 1
            r = parser(raw.decode("utf-8", "surrogateescape").rstrip("\r\n"), n, path.name)
            if r is not None:
                yield r


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        make_input(path, args.lines)
        sources = [str(path)]
        rows = {
            "lines only, baseline (readline + decode)": lambda: sum(
                1 for raw in open(path, "rb") if raw.decode("utf-8", "surrogateescape").rstrip("\r\n") is not None),
            "lines only, cbgen iter_lines": lambda: sum(1 for _ in iter_lines(sources)),
            "parsed, baseline reader": lambda: sum(1 for _ in baseline_records(path, LineParser(SamplingParams()))),
            "parsed, cbgen read_records": lambda: sum(
                1 for _ in read_records(sources, LineParser(SamplingParams(), sources=[path.name]))),
        }
        print(f"{args.lines} lines, {path.stat().st_size / 1e6:.1f} MB, best of {args.repeats}")
        for name, fn in rows.items():
            s = best(fn, args.repeats)
            print(f"{name:<45} {args.lines / s:>12,.0f} lines/s  ({s:.3f} s)")


if __name__ == "__main__":
    main()
